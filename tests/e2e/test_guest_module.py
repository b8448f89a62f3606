"""Our own guest balloon driver (guest/linux, vhostballoon_guest.ko) in a real
Linux guest under a real QEMU 10.2, against the back-end and QEMU's own balloon.

The module is built here, once per session, from guest/linux against the
rig's guest kernel headers, and carried into the guest in a second initramfs
archive; ``vb.balloon=vhostballoon_guest`` on the kernel command line makes
the guest's /init load it instead of virtio_balloon.  These tests cover the
path every device gets: 4 KiB pages by PFN, as virtio_balloon (the device
does not offer, or the test turns off, range ballooning).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import trio

from vhostballoon.device.features import FEATURE_FLAGS
from vhostballoon.testing.host import HugePagesUnavailable, meminfo, reserved_huge_pages, smaps_total, vmstat
from vhostballoon.testing.qemu import (
    GUEST_RAM_NAME,
    GUEST_612_DIR,
    GUEST_DIR,
    QemuGuest,
    balloon_builtin_args,
    balloon_guest,
    balloon_vhost_user_args,
    build_guest_module,
    guest_initrd_with_modules,
)

MiB = 1 << 20
GiB = 1 << 30
PAGE = 4096
REPO = Path(__file__).resolve().parents[2]
MODULE_SOURCE = REPO / "guest" / "linux"
ADD_MODULES = REPO.parent / "shared" / "e2e" / "add-guest-modules.sh"
MODULE = "vhostballoon_guest"
LOAD_MODULE = f"vb.balloon={MODULE}"
RANGES_BIT = 60  # protocol/range-balloon.md: VIRTIO_BALLOON_F_RANGES
# The PFN path on this back-end: free page reporting off (it would hand back
# the guest's freed memory before the balloon starts) and, where the back-end
# knows range ballooning, that off too.
BACKEND_HAS_RANGES = "ranges" in FEATURE_FLAGS
PFN_ONLY = "--features=-reporting" + (",-ranges" if BACKEND_HAS_RANGES else "")
# Queues QEMU's generic device gives the guest: with the range queues up to
# 7 (protocol/range-balloon.md); a back-end without them serves at most 5.
NUM_VQS = 7 if BACKEND_HAS_RANGES else 5


def module_initrd(tmp_path_factory, guest_dir: Path) -> Path:
    if not ADD_MODULES.exists():
        pytest.skip(f"{ADD_MODULES} is missing (the rig's add-guest-modules.sh)")
    out = tmp_path_factory.mktemp(f"module-{guest_dir.name}")
    ko, why = build_guest_module(MODULE_SOURCE, guest_dir, out)
    if ko is None:
        pytest.skip(f"cannot build {MODULE}.ko for {guest_dir}: {why}")
    return guest_initrd_with_modules(out / "initramfs.gz", [ko], guest_dir, ADD_MODULES)


@pytest.fixture(scope="session")
def initrd_61(tmp_path_factory) -> Path:
    """The 6.1 guest's initramfs carrying the module built for it."""
    return module_initrd(tmp_path_factory, GUEST_DIR)


@pytest.fixture(scope="session")
def initrd_612(tmp_path_factory) -> Path:
    """The same for the rig's Linux 6.12 guest (skipped when not built)."""
    if not (GUEST_612_DIR / "vmlinuz").exists():
        pytest.skip(f"no Linux 6.12 guest at {GUEST_612_DIR} (OUT={GUEST_612_DIR} KPKG=linux-image-6.12.*+deb12-amd64 build-guest.sh)")
    return module_initrd(tmp_path_factory, GUEST_612_DIR)


def sysfs_bits(features: str) -> int:
    """/sys/bus/virtio/devices/*/features: one character per bit, bit 0 first."""
    return sum(1 << i for i, c in enumerate(features) if c == "1")


def balloon_pages(vmstat: dict[str, int]) -> int:
    return vmstat["balloon_inflate"] - vmstat["balloon_deflate"]


async def balloon_device(guest: QemuGuest) -> dict[str, str]:
    [dev] = [d for d in await guest.devices() if d["device"] == "0x0005"]
    return dev


async def orders(guest: QemuGuest) -> dict[str, str]:
    """The module's debugfs file: ``name value`` lines, and per order
    ``order blocks pages inflated_blocks alloc_failures`` (as ``order<N>``)."""
    result = await guest.run(
        f"sh mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug; "
        f"cat /sys/kernel/debug/{MODULE}/orders"
    )
    assert result.rc == 0, result.lines
    out: dict[str, str] = {}
    for line in result.lines:
        words = line.split()
        if words and words[0].isdigit():
            out[f"order{words[0]}"] = " ".join(words[1:])
        elif len(words) == 2:
            out[words[0]] = words[1]
    return out


async def wait_guest_pages(guest: QemuGuest, pages: int, timeout: float) -> dict[str, int]:
    """Poll the guest's vmstat until its balloon holds ``pages``."""
    vm: dict[str, int] = {}
    with trio.move_on_after(timeout):
        while True:
            vm = await guest.vmstat()
            if balloon_pages(vm) == pages:
                return vm
            await trio.sleep(0.2)
    raise AssertionError(f"guest balloon never held {pages} pages in {timeout} s: {vm}")


@pytest.mark.parametrize("path", ["pfn", "ranges"])
async def test_module_binds_and_balloons_1g_to_512m_and_back(tmp_path, backend_factory, initrd_61, path):
    if path == "ranges" and not BACKEND_HAS_RANGES:
        pytest.skip("this back-end does not offer range ballooning")
    features, num_vqs = (PFN_ONLY, 5) if path == "pfn" else ("--features=-reporting", NUM_VQS)
    backend = backend_factory("vb", features, "--stats-interval", "1")
    async with balloon_guest(tmp_path, backend.socket_path, initrd=initrd_61, append=LOAD_MODULE, num_vqs=num_vqs) as guest:
        dev = await balloon_device(guest)
        assert dev["driver"] == MODULE, dev
        assert int(dev["status"], 16) & 0x4, f"DRIVER_OK not set: {dev}"
        assert bool(sysfs_bits(dev["features"]) & (1 << RANGES_BIT)) == (path == "ranges")
        info = await backend.query()
        for name in ("must_tell_host", "stats_vq", "deflate_on_oom"):
            assert f"balloon:{name}" in info["features"], info["features"]
        queues = ["inflate", "deflate", "stats"] + (["range-inflate", "range-deflate"] if path == "ranges" else [])
        assert info["queues"] == queues

        assert (await guest.run("fill 800", timeout=120)).rc == 0
        await guest.run("unfill")
        mem0, vm0 = await guest.meminfo(), await guest.vmstat()
        host0 = guest.host_allocated()
        assert host0 > 800 * MiB

        info, seconds = await backend.balloon_and_time(512 * MiB)
        mem1, vm1 = await guest.meminfo(), await guest.vmstat()
        freed = host0 - guest.host_allocated()
        per_order = await orders(guest)
        print(f"\n{path} path, our module, plain memfd: 1 GiB -> 512 MiB in {seconds:.2f} s, "
              f"host freed {freed / MiB:.1f} MiB, {per_order['pfn_buffers']} PFN + {per_order['range_buffers']} range buffers")

        assert balloon_pages(vm1) - balloon_pages(vm0) == 512 * MiB // PAGE
        # DEFLATE_ON_OOM negotiated: ballooned pages stay in MemTotal, as
        # with virtio_balloon, and leave MemFree.
        assert mem1["MemTotal"] == mem0["MemTotal"]
        assert 480 * 1024 <= mem0["MemFree"] - mem1["MemFree"] <= 560 * 1024, (mem0, mem1)
        assert freed >= 480 * MiB, f"host memory dropped only {freed / MiB:.1f} MiB"
        assert info["ballooned-bytes"] == 512 * MiB
        if path == "pfn":
            assert per_order["ranges"] == "off"
            assert per_order["order0"].split()[:2] == ["131072", "131072"], per_order
            assert per_order["pfn_pages_inflated"] == "131072" and per_order["range_pages_inflated"] == "0"
        else:
            # A guest that has just freed 800 MiB has it in large blocks:
            # all of it goes as 2 MiB ranges, 128 to a buffer (the ring).
            assert per_order["ranges"] == "on"
            assert per_order["order9"].split()[:2] == ["256", "131072"], per_order
            assert per_order["range_pages_inflated"] == "131072" and per_order["range_buffers"] == "2"
            assert info["pages-ballooned-by-range"] == 131072 and info["pages-ballooned-by-pfn"] == 0
            assert info["ranges-by-order"] == {"9": 256} and info["ranges-refused"] == 0
        # The stats queue works: the back-end gets the guest's numbers, fresh
        # ones each second (free memory shows the balloon).
        await backend.wait_for(
            lambda i: 0 < i.get("guest-stats", {}).get("stats", {}).get("stat-free-memory", 0) < 600 * MiB,
            10, "guest stats with the balloon's 512 MiB gone from free memory",
        )

        await backend.execute("balloon", value=GiB)
        info = await backend.wait_for(lambda i: i["actual"] == GiB, 90, "guest back at 1 GiB")
        vm2 = await guest.vmstat()
        assert balloon_pages(vm2) == balloon_pages(vm0)
        assert vm2["balloon_deflate"] - vm0["balloon_deflate"] == 512 * MiB // PAGE
        assert info["ballooned-bytes"] == 0
        assert (await guest.run("fill 600", timeout=120)).rc == 0  # the memory is usable again


async def test_module_balloons_by_pfn_on_qemus_own_balloon(tmp_path, initrd_61):
    guest = await QemuGuest.start(
        tmp_path, balloon_builtin_args(free_page_reporting=False), initrd=initrd_61, append=LOAD_MODULE
    )
    try:
        dev = await balloon_device(guest)
        assert dev["driver"] == MODULE, dev
        assert not sysfs_bits(dev["features"]) & (1 << RANGES_BIT)  # QEMU's device knows no ranges
        assert (await guest.run("fill 800", timeout=120)).rc == 0
        await guest.run("unfill")
        vm0, host0 = await guest.vmstat(), guest.host_allocated()

        start = time.monotonic()
        await guest.qmp("balloon", value=512 * MiB)
        async with guest.qmp_session() as qmp:
            with trio.fail_after(90):
                while (await qmp.execute("query-balloon"))["actual"] != 512 * MiB:
                    await trio.sleep(0.1)
        seconds = time.monotonic() - start
        vm1 = await guest.vmstat()
        freed = host0 - guest.host_allocated()
        print(f"\nour module on QEMU's balloon: 1 GiB -> 512 MiB in {seconds:.2f} s, host freed {freed / MiB:.1f} MiB")
        assert balloon_pages(vm1) - balloon_pages(vm0) == 512 * MiB // PAGE
        assert freed >= 480 * MiB

        await guest.qmp("balloon", value=GiB)
        await wait_guest_pages(guest, balloon_pages(vm0), 60)
        async with guest.qmp_session() as qmp:
            assert (await qmp.execute("query-balloon"))["actual"] == GiB
    finally:
        await guest.kill()


async def test_oom_takes_pages_back_from_a_full_balloon(tmp_path, backend_factory, initrd_61):
    """DEFLATE_ON_OOM: a guest that needs more than the balloon left it gets
    pages back through the OOM notifier, before the OOM killer kills anyone."""
    backend = backend_factory("vb", "--features=-reporting")
    async with balloon_guest(tmp_path, backend.socket_path, initrd=initrd_61, append=LOAD_MODULE, num_vqs=NUM_VQS) as guest:
        await backend.execute("balloon", value=384 * MiB)
        await backend.wait_for(lambda i: i["actual"] == 384 * MiB, 90, "guest at 384 MiB")
        vm0 = await guest.vmstat()
        assert balloon_pages(vm0) == 640 * MiB // PAGE

        # More than the guest has left: tmpfs pages cannot be reclaimed
        # (no swap), so the allocator runs out and asks the OOM notifier.
        fill = await guest.run("fill 450", timeout=180)
        vm1 = await guest.vmstat()
        returned = vm1["balloon_deflate"] - vm0["balloon_deflate"]
        per_order = await orders(guest)
        killed = await guest.run("sh dmesg | grep -c 'Killed process' || true")
        print(f"\nOOM: fill rc {fill.rc}, {returned} pages returned by the OOM notifier, "
              f"debugfs oom_pages_returned {per_order['oom_pages_returned']}, splits {per_order['splits']}")
        assert fill.rc == 0, f"fill failed: {fill.lines}"
        assert killed.lines[-1].strip() == "0", "the OOM killer killed a process although the balloon had pages"
        assert returned >= 64 * MiB // PAGE, vm1
        assert int(per_order["oom_pages_returned"]) == returned
        info = await backend.wait_for(lambda i: i["actual"] == 384 * MiB + returned * PAGE, 10, "actual follows")
        assert info["target"] == 384 * MiB  # the operator's target stays


async def test_rmmod_with_a_full_balloon_gives_every_page_back_and_reporting_works(
    tmp_path, backend_factory, initrd_61
):
    """Free page reporting on (the back-end's defaults); then unloading the
    module with 512 MiB in the balloon tells the device and frees it all, and
    loading it again balloons back to the target."""
    backend = backend_factory("vb")
    async with balloon_guest(tmp_path, backend.socket_path, initrd=initrd_61, append=LOAD_MODULE, num_vqs=NUM_VQS) as guest:
        info = await backend.query()
        assert "balloon:reporting" in info["features"], info["features"]
        assert (await guest.run("fill 800", timeout=120)).rc == 0
        full = guest.host_allocated()
        await guest.run("unfill")
        with trio.fail_after(20):  # Linux reports free blocks 2 s after they are freed
            while full - guest.host_allocated() < 600 * MiB:
                await trio.sleep(0.25)
        reported = (await backend.query())["report-freed-bytes"]
        assert reported >= 600 * MiB

        await backend.execute("balloon", value=512 * MiB)
        await backend.wait_for(lambda i: i["actual"] == 512 * MiB, 90, "guest at 512 MiB")
        mem0 = await guest.meminfo()

        assert (await guest.run(f"sh rmmod {MODULE}", timeout=60)).rc == 0
        vm1, mem1 = await guest.vmstat(), await guest.meminfo()
        assert balloon_pages(vm1) == 0
        assert mem1["MemFree"] - mem0["MemFree"] >= 500 * 1024, (mem0, mem1)
        info = await backend.wait_for(lambda i: i["ballooned-bytes"] == 0, 10, "the device told of every page")
        assert info["actual"] == GiB and info["target"] == 512 * MiB
        assert (await balloon_device(guest))["driver"] == "none"

        assert (await guest.run(f"sh insmod /lib/modules/extra/{MODULE}.ko")).rc == 0
        await backend.wait_for(lambda i: i["actual"] == 512 * MiB, 90, "reloaded module at the target")
        assert balloon_pages(await guest.vmstat()) == 512 * MiB // PAGE


async def test_module_on_linux_612(tmp_path, backend_factory, initrd_612):
    backend = backend_factory("vb", "--features=-reporting", "--stats-interval", "1")
    guest_612 = {"kernel": GUEST_612_DIR / "vmlinuz", "initrd": initrd_612, "append": LOAD_MODULE}
    async with balloon_guest(tmp_path, backend.socket_path, num_vqs=NUM_VQS, **guest_612) as guest:
        assert any("kernel=6.12" in line for line in guest.console), guest.console[-5:]
        dev = await balloon_device(guest)
        assert dev["driver"] == MODULE, dev
        await backend.execute("balloon", value=512 * MiB)
        info = await backend.wait_for(lambda i: i["actual"] == 512 * MiB, 90, "6.12 guest at 512 MiB")
        assert balloon_pages(await guest.vmstat()) == 512 * MiB // PAGE
        assert info["ballooned-bytes"] == 512 * MiB
        if BACKEND_HAS_RANGES:
            assert (await orders(guest))["ranges"] == "on"
            assert info["pages-ballooned-by-range"] >= 500 * MiB // PAGE, info
        # 6.12's extra statistics arrive (allocation stalls, scans, reclaims).
        info = await backend.wait_for(lambda i: "stat-alloc-stalls" in i.get("guest-stats", {}).get("stats", {}), 15, "6.12 stats")
        assert (await guest.run(f"sh rmmod {MODULE}", timeout=60)).rc == 0
        assert balloon_pages(await guest.vmstat()) == 0
        await backend.wait_for(lambda i: i["ballooned-bytes"] == 0, 10, "every page back")


# ---- range ballooning on huge-page-backed guest RAM -----------------------------------

needs_ranges = pytest.mark.skipif(not BACKEND_HAS_RANGES, reason="this back-end does not offer range ballooning")
HUGE = 2 * MiB


@needs_ranges
async def test_ranges_free_whole_thps_split_none_and_a_partial_deflate_splits_one_block(
    tmp_path, backend_factory, initrd_61, thp_guest_ram
):
    backend = backend_factory("vb", "--features=-reporting")
    guest = await QemuGuest.start(
        tmp_path, balloon_vhost_user_args(backend.socket_path, num_vqs=NUM_VQS),
        ram_fd=thp_guest_ram, initrd=initrd_61, append=LOAD_MODULE,
    )
    try:
        assert (await guest.run("fill 800", timeout=120)).rc == 0
        await guest.run("unfill")
        pmd = smaps_total(guest.process.pid, GUEST_RAM_NAME, "ShmemPmdMapped")
        knob = open("/sys/kernel/mm/transparent_hugepage/shmem_enabled").read().strip()
        # The knob is machine-wide: a test elsewhere that sets it to never
        # meanwhile leaves guest RAM partly without THPs (rerun then).
        assert pmd >= 800 * MiB, (
            f"guest RAM should be THP-backed after fill 800: ShmemPmdMapped {pmd / MiB:.0f} MiB; shmem_enabled now: {knob}"
        )
        host0, splits0 = guest.host_allocated(), vmstat("thp_split_page")

        info, seconds = await backend.balloon_and_time(512 * MiB)
        await trio.sleep(0.5)
        info = await backend.query()
        freed, splits = host0 - guest.host_allocated(), vmstat("thp_split_page") - splits0
        print(f"\nranges, THP-backed RAM: 1 GiB -> 512 MiB in {seconds:.2f} s; host freed {freed / MiB:.1f} MiB, "
              f"{info['huge-pages-freed-whole']} huge pages whole, thp_split_page +{splits} "
              f"(shmem_enabled may be changed by others: rerun if this fails on splits)")
        assert info["pages-ballooned-by-range"] == 512 * MiB // PAGE and info["ranges-by-order"] == {"9": 256}
        assert splits == 0 and info["thp-splits"] == 0
        assert info["huge-pages-freed-whole"] >= 250
        assert freed >= 500 * MiB

        # Three pages back: less than a block, so exactly one 2 MiB block is
        # split; its first 3 pages go as one range and the rest stays, as
        # aligned blocks of orders 0 and 2..8.
        await backend.execute("balloon", value=512 * MiB + 3 * PAGE)
        info = await backend.wait_for(lambda i: i["actual"] == 512 * MiB + 3 * PAGE, 30, "3 pages back")
        per_order = await orders(guest)
        assert per_order["splits"] == "1"
        assert per_order["order9"].split()[0] == "255"
        assert per_order["order0"].split()[0] == "1" and per_order["order1"].split()[0] == "0"
        assert all(per_order[f"order{o}"].split()[0] == "1" for o in range(2, 9)), per_order
        assert info["pages-deflated-by-range"] == 3
        assert balloon_pages(await guest.vmstat()) == 512 * MiB // PAGE - 3

        # And all back, lowest order first (the order-0 page by PFN).
        await backend.execute("balloon", value=GiB)
        info = await backend.wait_for(lambda i: i["actual"] == GiB, 60, "all back")
        assert info["ballooned-bytes"] == 0 and balloon_pages(await guest.vmstat()) == 0
    finally:
        await guest.kill()


HUGETLB_PAGES = 512 + 8  # 1 GiB of guest RAM and a little room


@pytest.fixture
def hugetlb_pages():
    """HUGETLB_PAGES more persistent 2 MiB huge pages, given back after."""
    if meminfo("Hugepagesize") != HUGE:
        pytest.skip(f"the default huge page size here is not 2 MiB: {meminfo('Hugepagesize')} bytes")
    try:
        with reserved_huge_pages(HUGETLB_PAGES):
            yield
    except HugePagesUnavailable as exc:
        pytest.skip(str(exc))


@needs_ranges
async def test_ranges_give_hugetlbfs_huge_pages_back(tmp_path, backend_factory, initrd_61, hugetlb_pages):
    backend = backend_factory("vb", "--features=-reporting")
    guest = await QemuGuest.start(
        tmp_path, balloon_vhost_user_args(backend.socket_path, num_vqs=NUM_VQS),
        ram_options="hugetlb=on,hugetlbsize=2M", initrd=initrd_61, append=LOAD_MODULE,
    )
    try:
        assert (await guest.run("fill 800", timeout=120)).rc == 0
        await guest.run("unfill")
        free0 = meminfo("HugePages_Free")
        info, seconds = await backend.balloon_and_time(512 * MiB)
        with trio.move_on_after(10):
            while meminfo("HugePages_Free") - free0 < 250:
                await trio.sleep(0.1)
        back = meminfo("HugePages_Free") - free0
        info = await backend.query()
        print(f"\nranges, hugetlbfs RAM: 1 GiB -> 512 MiB in {seconds:.2f} s; {back} huge pages "
              f"({back * 2} MiB) back in HugePages_Free; freed-hugetlbfs-bytes {info['freed-hugetlbfs-bytes'] / MiB:.0f} MiB")
        assert info["pages-ballooned-by-range"] == 512 * MiB // PAGE
        assert back * HUGE >= 500 * MiB
    finally:
        await guest.kill()
