"""
Specification of gpu_monitor.GPUMonitor, checked on CPU: the no-driver path
runs against the real (driverless) environment or a failing NVML, the
measuring path against a scripted fake NVML.
"""

import itertools
import os
import sys
import time
import types

import pytest

# import gpu_monitor from the repository root whichever way pytest was invoked
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import gpu_monitor
from gpu_monitor import GPUMonitor

GB = 1024 ** 3
NOTICE = "gpu_monitor: NVML unavailable"

class FakeNVMLError(Exception):
    pass

def make_fake_nvml(memory_used, utilization, name=b"Fake GPU", init_error=None,
                   handle_error=None, utilization_error=None):
    """A stand-in for the pynvml module that replays scripted readings.

    memory_used and utilization are lists replayed in a cycle, one value per
    sample. Calls to nvmlInit / nvmlShutdown are counted on the module.
    """
    nvml = types.SimpleNamespace(NVMLError=FakeNVMLError, init_calls=0, shutdown_calls=0)
    memory = itertools.cycle(memory_used)
    util = itertools.cycle(utilization)

    def nvmlInit():
        nvml.init_calls += 1
        if init_error is not None:
            raise init_error

    def nvmlShutdown():
        nvml.shutdown_calls += 1

    def nvmlDeviceGetHandleByIndex(index):
        if handle_error is not None:
            raise handle_error
        return ("handle", index)

    def nvmlDeviceGetUtilizationRates(handle):
        if utilization_error is not None:
            raise utilization_error
        return types.SimpleNamespace(gpu=next(util), memory=0)

    nvml.nvmlInit = nvmlInit
    nvml.nvmlShutdown = nvmlShutdown
    nvml.nvmlDeviceGetHandleByIndex = nvmlDeviceGetHandleByIndex
    nvml.nvmlDeviceGetName = lambda handle: name
    nvml.nvmlDeviceGetMemoryInfo = lambda handle: types.SimpleNamespace(used=next(memory), total=80 * GB)
    nvml.nvmlDeviceGetUtilizationRates = nvmlDeviceGetUtilizationRates
    return nvml

@pytest.fixture(autouse=True)
def fresh_notice_flag(monkeypatch):
    # every test starts as if it were the first monitor in the process
    monkeypatch.setattr(gpu_monitor, "_warned_unavailable", False)

def use_fake(monkeypatch, **kwargs):
    fake = make_fake_nvml(**kwargs)
    monkeypatch.setattr(gpu_monitor, "_load_nvml", lambda: fake)
    return fake

def real_nvml_works():
    try:
        import pynvml
    except ImportError:
        return False
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver, no library: what GPUMonitor itself catches
        return False
    pynvml.nvmlShutdown()
    return True

def assert_unavailable_summary(mon):
    assert mon.summary() == {
        "available": False,
        "samples": 0,
        "peak_memory_bytes": None,
        "mean_utilization_pct": None,
        "device_name": None,
    }

# -----------------------------------------------------------------------------
# without a driver: a quiet no-op

@pytest.mark.skipif(real_nvml_works(), reason="this machine has a working NVIDIA driver")
def test_without_driver_monitor_is_noop_and_says_so_once_across_monitors(capsys):
    first = GPUMonitor(interval=0.01)
    first.start()
    first.stop()
    with GPUMonitor(interval=0.01) as second:
        pass
    assert_unavailable_summary(first)
    assert_unavailable_summary(second)
    err = capsys.readouterr().err
    assert err.count(NOTICE) == 1
    assert err.strip().endswith("GPU utilization not measured")

def test_failing_nvml_init_is_noop_and_says_so_once(monkeypatch, capsys):
    fake = use_fake(monkeypatch, memory_used=[GB], utilization=[50],
                    init_error=FakeNVMLError("Driver Not Loaded"))
    for _ in range(2):
        with GPUMonitor(interval=0.01) as mon:
            pass
        assert_unavailable_summary(mon)
    err = capsys.readouterr().err
    assert err.count(NOTICE) == 1
    assert "Driver Not Loaded" in err
    assert fake.shutdown_calls == 0  # nothing was initialised, so nothing to shut down

def test_missing_pynvml_module_is_noop(monkeypatch, capsys):
    def no_pynvml():
        raise ImportError("No module named 'pynvml'")
    monkeypatch.setattr(gpu_monitor, "_load_nvml", no_pynvml)
    with GPUMonitor() as mon:
        pass
    assert_unavailable_summary(mon)
    assert capsys.readouterr().err.count(NOTICE) == 1

def test_unknown_device_index_is_noop_and_balances_nvml_init(monkeypatch, capsys):
    fake = use_fake(monkeypatch, memory_used=[GB], utilization=[50],
                    handle_error=FakeNVMLError("Invalid Argument"))
    with GPUMonitor(device_index=7) as mon:
        pass
    assert_unavailable_summary(mon)
    assert (fake.init_calls, fake.shutdown_calls) == (1, 1)
    assert capsys.readouterr().err.count(NOTICE) == 1

# -----------------------------------------------------------------------------
# with NVML: the figures

def test_start_and_stop_each_take_one_sample_giving_max_memory_and_mean_utilization(monkeypatch):
    # an interval far longer than the test means the thread never polls, so
    # exactly the start and the stop sample are taken
    use_fake(monkeypatch, memory_used=[3 * GB, 1 * GB], utilization=[20, 60])
    mon = GPUMonitor(interval=60)
    mon.start()
    mon.stop()
    assert mon.samples == 2
    assert mon.peak_memory_bytes == 3 * GB
    assert mon.mean_utilization == pytest.approx(40.0)

def test_background_thread_polls_between_start_and_stop(monkeypatch):
    # max of the cycle is reached by the second sample and utilization is
    # constant, so the figures do not depend on how many polls happened
    use_fake(monkeypatch, memory_used=[1 * GB, 3 * GB, 2 * GB], utilization=[50])
    with GPUMonitor(interval=0.01) as mon:
        deadline = time.monotonic() + 5.0
        while mon.samples < 4 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert mon.samples >= 5  # start sample + >= 3 polls + stop sample
    assert mon.peak_memory_bytes == 3 * GB
    assert mon.mean_utilization == pytest.approx(50.0)

def test_summary_reports_figures_and_decoded_device_name(monkeypatch):
    use_fake(monkeypatch, memory_used=[2 * GB], utilization=[75], name=b"Fake GPU")
    with GPUMonitor(interval=60) as mon:
        pass
    assert mon.summary() == {
        "available": True,
        "samples": 2,
        "peak_memory_bytes": 2 * GB,
        "mean_utilization_pct": pytest.approx(75.0),
        "device_name": "Fake GPU",
    }

def test_unsupported_utilization_still_records_memory(monkeypatch):
    use_fake(monkeypatch, memory_used=[2 * GB], utilization=[0],
             utilization_error=FakeNVMLError("Not Supported"))
    with GPUMonitor(interval=60) as mon:
        pass
    assert mon.samples == 2
    assert mon.peak_memory_bytes == 2 * GB
    assert mon.mean_utilization is None

def test_nvml_is_shut_down_at_stop(monkeypatch):
    fake = use_fake(monkeypatch, memory_used=[GB], utilization=[10])
    mon = GPUMonitor(interval=60)
    mon.start()
    assert (fake.init_calls, fake.shutdown_calls) == (1, 0)
    mon.stop()
    assert (fake.init_calls, fake.shutdown_calls) == (1, 1)

def test_context_manager_stops_the_monitor_when_the_body_raises(monkeypatch):
    fake = use_fake(monkeypatch, memory_used=[GB], utilization=[10])
    with pytest.raises(RuntimeError, match="boom"), GPUMonitor(interval=0.01):
        raise RuntimeError("boom")
    assert fake.shutdown_calls == 1

# -----------------------------------------------------------------------------
# stop() is safe to call at any time

def test_stop_is_idempotent(monkeypatch):
    fake = use_fake(monkeypatch, memory_used=[GB], utilization=[10])
    mon = GPUMonitor(interval=60)
    mon.start()
    mon.stop()
    mon.stop()
    assert mon.samples == 2  # the second stop takes no further sample
    assert fake.shutdown_calls == 1  # and does not shut NVML down again

def test_stop_without_start_is_safe_and_touches_no_nvml(monkeypatch):
    fake = use_fake(monkeypatch, memory_used=[GB], utilization=[10])
    mon = GPUMonitor()
    mon.stop()
    assert (fake.init_calls, fake.shutdown_calls) == (0, 0)
    assert_unavailable_summary(mon)
