"""
A small GPU monitor: a daemon thread polls NVML for memory used and
utilization while some other code (training, inference) runs, then reports
the peak memory and the mean utilization over that window.

    with GPUMonitor() as mon:
        train()
    print(mon.summary())

NVML comes from the `pynvml` module of the `nvidia-ml-py` package. On a machine
without an NVIDIA driver the monitor is a no-op that says so once on stderr, so
the same code runs unchanged on CPU-only machines and in tests.

Quick check from the command line:

    python gpu_monitor.py --seconds 2
"""

import argparse
import json
import sys
import threading
import time

# The "NVML unavailable" notice is printed once per process, not once per
# monitor, so a script that makes many monitors does not flood stderr.
_warned_unavailable = False

def _load_nvml():
    """Import and return the pynvml module.

    Lazy, so importing this file never requires nvidia-ml-py, and a function of
    its own, so tests can monkeypatch it to hand back a fake NVML.
    """
    import pynvml
    return pynvml

def _warn_unavailable(reason):
    global _warned_unavailable
    if _warned_unavailable:
        return
    _warned_unavailable = True
    print(f"gpu_monitor: NVML unavailable ({reason}); GPU utilization not measured",
          file=sys.stderr)

class GPUMonitor:
    """Polls one GPU through NVML from a daemon thread every `interval` seconds."""

    def __init__(self, device_index: int = 0, interval: float = 0.5):
        self.device_index = device_index
        self.interval = interval
        self.available = False  # True once NVML initialised and the device was found
        self.device_name = None
        self._nvml = None  # the pynvml module while NVML is initialised, else None
        self._handle = None
        self._thread = None
        self._stop_event = threading.Event()
        # the sampler thread writes the figures while the caller may read them
        self._lock = threading.Lock()
        self._reset_figures()

    def _reset_figures(self):
        self._samples = 0
        self._peak_memory = None
        self._util_sum = 0.0
        self._util_count = 0

    # -------------------------------------------------------------------------
    # start / stop

    def start(self):
        if self._nvml is not None:
            return  # already running
        try:
            nvml = _load_nvml()
        except ImportError as e:
            _warn_unavailable(e)
            return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as e:
            _warn_unavailable(e)
            return
        try:
            handle = nvml.nvmlDeviceGetHandleByIndex(self.device_index)
            name = nvml.nvmlDeviceGetName(handle)
        except nvml.NVMLError as e:
            # e.g. no such device index: balance the nvmlInit above before giving up
            self._shutdown(nvml)
            _warn_unavailable(e)
            return
        # older nvidia-ml-py versions return the name as bytes
        self.device_name = name.decode() if isinstance(name, bytes) else name
        self._nvml, self._handle = nvml, handle
        self.available = True
        with self._lock:
            self._reset_figures()  # a monitor measures one start..stop window
        self._stop_event.clear()
        # sample now, so a run shorter than one interval still gets a figure
        self._sample()
        # daemon, so a forgotten stop() never keeps the interpreter alive
        self._thread = threading.Thread(target=self._run, name="gpu_monitor", daemon=True)
        self._thread.start()

    def stop(self):
        if self._nvml is None:
            return  # never started, start failed, or already stopped
        self._stop_event.set()
        self._thread.join()
        self._thread = None
        # sample once more, so the end of a short run is seen as well
        self._sample()
        self._shutdown(self._nvml)
        self._nvml, self._handle = None, None

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.stop()
        return False  # never swallow the caller's exception

    # -------------------------------------------------------------------------
    # sampling

    def _run(self):
        # Event.wait doubles as the sleep, so stop() wakes the thread at once
        while not self._stop_event.wait(self.interval):
            self._sample()

    def _sample(self):
        nvml, handle = self._nvml, self._handle
        # memory and utilization are read separately because some devices (e.g.
        # MIG instances) report memory but raise NotSupported for utilization
        try:
            used = nvml.nvmlDeviceGetMemoryInfo(handle).used
        except nvml.NVMLError:
            used = None
        try:
            util = nvml.nvmlDeviceGetUtilizationRates(handle).gpu
        except nvml.NVMLError:
            util = None
        if used is None and util is None:
            return
        with self._lock:
            self._samples += 1
            if used is not None:
                self._peak_memory = used if self._peak_memory is None else max(self._peak_memory, used)
            if util is not None:
                self._util_sum += util
                self._util_count += 1

    @staticmethod
    def _shutdown(nvml):
        # a failing shutdown must not turn stop() into an error for the caller
        try:
            nvml.nvmlShutdown()
        except nvml.NVMLError:
            pass

    # -------------------------------------------------------------------------
    # results

    @property
    def samples(self):
        with self._lock:
            return self._samples

    @property
    def peak_memory_bytes(self):
        with self._lock:
            return self._peak_memory

    @property
    def mean_utilization(self):
        with self._lock:
            return self._util_sum / self._util_count if self._util_count else None

    def summary(self):
        return {
            "available": self.available,
            "samples": self.samples,
            "peak_memory_bytes": self.peak_memory_bytes,
            "mean_utilization_pct": self.mean_utilization,
            "device_name": self.device_name,
        }

# -----------------------------------------------------------------------------

def main():
    parser = argparse.ArgumentParser(description="Monitor one GPU for a while and print a JSON summary.")
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to monitor")
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--device", type=int, default=0, help="NVML device index")
    args = parser.parse_args()
    with GPUMonitor(device_index=args.device, interval=args.interval) as mon:
        time.sleep(args.seconds)
    print(json.dumps(mon.summary()))

if __name__ == "__main__":
    main()
