"""Resource use of the server while perf_analyzer measures it: CPU of the server's process tree and
GPU utilization / memory.

    sampler = UsageSampler(pid=server.pid, metrics_url=server.metrics_url)
    with sampler:                 # a background thread samples every 0.5 s
        ... measure a level ...
        usage = sampler.take()    # averages since the last take(): {"server_cpu_pct": ..., ...}

CPU: psutil over the server process and its children (the python backend's stubs, which do the
model's work), in percent of one core (200 = two cores busy). GPU: NVML (nvidia-ml-py) when a GPU
and its driver are there, else Triton's own `nv_gpu_utilization` / `nv_gpu_memory_used_bytes`
metrics, else nothing (the columns stay empty).
"""

from __future__ import annotations

import threading
import time
import urllib.request

USAGE_FIELDS = ("server_cpu_pct", "gpu_util_pct", "gpu_mem_mb")


def _nvml_reader():
    """A function returning (util %, memory used MB) summed over the GPUs, or None without NVML."""
    try:
        import pynvml

        pynvml.nvmlInit()
        handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
    except Exception:  # noqa: BLE001 - no driver, no GPU, no library: the next source is tried
        return None
    if not handles:
        return None

    def read():
        util = [pynvml.nvmlDeviceGetUtilizationRates(h).gpu for h in handles]
        mem = [pynvml.nvmlDeviceGetMemoryInfo(h).used for h in handles]
        return sum(util) / len(util), sum(mem) / 2**20

    return read


def parse_gpu_metrics(text: str) -> tuple[float, float] | None:
    """(mean nv_gpu_utilization in %, summed nv_gpu_memory_used_bytes in MB) from Triton's Prometheus text."""
    util, mem = [], []
    for line in text.splitlines():
        if line.startswith("nv_gpu_utilization{"):
            util.append(float(line.rsplit(" ", 1)[1]) * 100)  # Triton reports a 0..1 fraction
        elif line.startswith("nv_gpu_memory_used_bytes{"):
            mem.append(float(line.rsplit(" ", 1)[1]))
    if not util:
        return None
    return sum(util) / len(util), sum(mem) / 2**20


def _metrics_reader(metrics_url: str | None):
    if not metrics_url:
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def read():
        try:
            with opener.open(f"http://{metrics_url}/metrics", timeout=1) as response:
                return parse_gpu_metrics(response.read().decode("utf-8", "replace"))
        except OSError:
            return None

    return read if read() is not None else None


class UsageSampler:
    """Samples in a daemon thread; `take()` returns the averages since the previous `take()`."""

    def __init__(self, pid: int | None = None, metrics_url: str | None = None, interval_s: float = 0.5):
        self.interval_s = interval_s
        self._process = None
        if pid:
            try:
                import psutil

                self._process = psutil.Process(pid)
            except Exception:  # noqa: BLE001 - psutil missing or the process gone: no CPU numbers
                self._process = None
        self._gpu = _nvml_reader() or _metrics_reader(metrics_url)
        self._lock = threading.Lock()
        self._samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._cpu_last: tuple[float, float] | None = None

    @property
    def active(self) -> bool:
        return self._process is not None or self._gpu is not None

    def _cpu_seconds(self) -> float | None:
        """User + system CPU seconds of the server and all its children (live ones)."""
        import psutil

        try:
            procs = [self._process, *self._process.children(recursive=True)]
        except psutil.Error:
            return None
        total = 0.0
        for p in procs:
            try:
                t = p.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                continue
        return total

    def sample(self) -> dict:
        out: dict = {}
        if self._process is not None:
            now, cpu = time.monotonic(), self._cpu_seconds()
            if cpu is not None:
                if self._cpu_last is not None and now > self._cpu_last[0]:
                    # a stub that exited takes its seconds with it: never report below zero
                    out["server_cpu_pct"] = max(0.0, (cpu - self._cpu_last[1]) / (now - self._cpu_last[0]) * 100)
                self._cpu_last = (now, cpu)
        if self._gpu is not None:
            try:
                got = self._gpu()
            except Exception:  # noqa: BLE001
                got = None
            if got is not None:
                out["gpu_util_pct"], out["gpu_mem_mb"] = got
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            s = self.sample()
            if s:
                with self._lock:
                    self._samples.append(s)

    def take(self) -> dict[str, float]:
        """Mean of each field over the samples since the last call (fields without samples are left out)."""
        with self._lock:
            samples, self._samples = self._samples, []
        out = {}
        for name in USAGE_FIELDS:
            values = [s[name] for s in samples if name in s]
            if values:
                out[name] = sum(values) / len(values)
        return out

    def __enter__(self) -> "UsageSampler":
        if self.active:
            self.sample()  # the CPU baseline
            self._thread = threading.Thread(target=self._loop, name="usage-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
