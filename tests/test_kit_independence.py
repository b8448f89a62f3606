"""The conformance kit (vhostballoon.testing) stands alone.

It checks the back-end only if it does not share the back-end's code: a
wrong table on both sides agrees with itself.  So the kit imports nothing of
the back-end (checked here on the source of every kit module, and on what
importing the kit loads), and a back-end whose queue packing is wrong is
caught by the model guest (the last test).
"""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest

from backend_support import MiB, wait_until
from vhostballoon.device.hugepages import FlushPolicy, HugePolicy
from vhostballoon.server.daemon import run_backend
from vhostballoon.server.service import BalloonService
from vhostballoon.testing import DeviceTimeout, model_guest

KIT = "vhostballoon.testing"
KIT_DIR = Path(importlib.import_module(KIT).__file__).parent
BACKEND_PACKAGES = ("vhostballoon.server", "vhostballoon.vhost_user", "vhostballoon.device", "vhostballoon.native")


def imported_modules(source: str, module: str) -> set[str]:
    """The absolute names of every module ``source`` (the module ``module``,
    not a package) may import: ``import a.b``, ``from a.b import c`` (a.b and
    a.b.c: c may be a submodule), relative imports resolved, and string
    literals given to ``importlib.import_module`` or ``__import__``.
    Anywhere in the file, function bodies included."""
    package = module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            called = ast.unparse(node.func)
            if called in ("importlib.import_module", "import_module", "__import__") and isinstance(
                node.args[0].value, str
            ):
                names.add(node.args[0].value)
    return names


def backend_imports(names: set[str]) -> list[str]:
    return sorted(n for n in names if any(n == p or n.startswith(p + ".") for p in BACKEND_PACKAGES))


def kit_modules() -> list[tuple[str, Path]]:
    """(module name, path) of every kit source file; a package's own file is
    named ``package.__init__``, so that its relative imports resolve inside it."""
    return [
        (".".join([KIT, *path.relative_to(KIT_DIR).with_suffix("").parts]), path)
        for path in sorted(KIT_DIR.rglob("*.py"))
    ]


@pytest.mark.parametrize(
    "source",
    [
        "from ..server.transport import FdStream",
        "from ..device import features",
        "from .. import native",
        "import vhostballoon.vhost_user.codec as codec",
        "from vhostballoon.device.features import queue_roles",
        "from vhostballoon import server",
        "def later():\n    from ..native import GuestMemory",
        "import importlib\nimportlib.import_module('vhostballoon.server.session')",
    ],
)
def test_the_import_check_sees_a_backend_import(source):
    assert backend_imports(imported_modules(source, f"{KIT}.frontend")) != []


def test_the_import_check_lets_the_kit_import_itself():
    source = "from .wire import encode\nfrom . import fds\nimport trio\nfrom vhostballoon.testing.host import vmstat"
    assert backend_imports(imported_modules(source, f"{KIT}.frontend")) == []


def test_no_kit_module_imports_the_backend():
    modules = kit_modules()
    assert {name.rpartition(".")[2] for name, _ in modules} >= {"frontend", "balloon_driver", "wire", "fdsocket"}
    found = {
        name: backend_imports(imported_modules(path.read_text(), name))
        for name, path in modules
    }
    assert {name: bad for name, bad in found.items() if bad} == {}


def test_importing_every_kit_module_loads_nothing_of_the_backend():
    """What the source check cannot see: an import through some other module."""
    names = [name.removesuffix(".__init__") for name, _ in kit_modules()]
    code = (
        "import importlib, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.split()
    assert backend_imports(set(loaded)) == []


# -- a wrong queue packing in the back-end is caught ------------------------------------------------

# The back-end's map from negotiated features to queue roles (index -> role).
# The one line to update if the back-end's queue table moves:
BACKEND_QUEUE_TABLE = "vhostballoon.device.queues.queue_roles"

GUEST = 64 * MiB
BLOCK = 512  # pages in 2 MiB: what Linux reports


def corrupt_everywhere(monkeypatch, dotted: str, make_replacement) -> None:
    """Replace the function ``dotted`` in its module and in every loaded
    ``vhostballoon`` module that imported it by name: the back-end's modules,
    and the kit's too if it shared the back-end's table (it must not)."""
    module_name, _, attribute = dotted.rpartition(".")
    original = getattr(importlib.import_module(module_name), attribute)
    replacement = make_replacement(original)
    for name, module in list(sys.modules.items()):
        if name == "vhostballoon" or name.startswith("vhostballoon."):
            for key, value in list(vars(module).items()):
                if value is original:
                    monkeypatch.setattr(module, key, replacement)


def stats_and_reporting_swapped(queue_roles):
    """The packing with the stats and reporting queues trading places."""

    def swapped(features: int) -> list:
        roles = list(queue_roles(features))
        where = [i for i, role in enumerate(roles) if role.value in ("stats", "reporting")]
        if len(where) == 2:
            i, j = where
            roles[i], roles[j] = roles[j], roles[i]
        return roles

    return swapped


@pytest.mark.parametrize("backend_table", ["intact", "stats-and-reporting-swapped"])
async def test_the_model_guest_catches_a_wrong_queue_packing_in_the_backend(
    nursery, socket_path, monkeypatch, backend_table
):
    """With the back-end's table swapped, the guest (by its own table, from
    Linux's init_vqs) still puts its free page reports on queue 3, which the
    back-end now serves as the stats queue: the report never comes back and
    frees nothing.  A kit that used the back-end's table would move its
    reports to queue 2 along with it, and the run would pass."""
    swapped = backend_table != "intact"
    if swapped:
        corrupt_everywhere(monkeypatch, BACKEND_QUEUE_TABLE, stats_and_reporting_swapped)
    service = BalloonService(flush_policy=FlushPolicy(HugePolicy.EAGER))  # freed at once, whatever THP is
    backend = await nursery.start(partial(run_backend, socket_path, service=service))
    async with model_guest(backend.socket_path, ram_size=GUEST, buffer_timeout=2.0) as guest:
        driver = guest.driver
        first, count = driver.free_blocks(BLOCK)[0]
        block = set(range(first, first + count))
        info = service.query()
        if not swapped:
            assert info["queues"] == ["inflate", "deflate", "stats", "reporting"]
            assert await driver.report_free_pages([(first, count)]) == 0
            assert guest.ram.host_holes() == block
            assert service.query()["report-freed-bytes"] == 2 * MiB
            return
        assert info["queues"] == ["inflate", "deflate", "reporting", "stats"]  # the corruption reached the back-end
        with pytest.raises(DeviceTimeout, match=r"^queue 3: report of 1 ranges \(head \d+\) not returned by the device"):
            await driver.report_free_pages([(first, count)])
        assert guest.ram.host_holes() == set()
        assert service.query()["report-freed-bytes"] == 0
        # The back-end saw the guest's buffers in the wrong direction on both queues.
        broken = await wait_until(
            lambda: len(service.query()["broken-queues"]) == 2 and service.query()["broken-queues"],
            what="both swapped queues to break",
        )
        assert sorted(broken) == [2, 3]
        assert [role.value for role in driver.roles] == ["inflate", "deflate", "stats", "reporting"]  # Linux's
        print(f"the back-end's view: {info['queues']}; broken queues: {broken}")
