"""Host time of the bench's probed layers (``consolidator_apps.speed._probe_layers``: 64
features, 256 rows = 64 samples x 4), 300 interleaved repeats after 20 warm-up ones, medians in
microseconds. For side-by-side runs of two trees in separate processes, e.g.::

    for tree in /tmp/oldtree "$PWD" /tmp/oldtree "$PWD"; do
        (cd "$tree" && PYTHONPATH="$tree" python "$OLDPWD/docs/host_time/probe.py" plain,fast,fast_nodrop)
    done

(the measurement behind README's "Host time at batch 64"; a one-off script, not a test).
"""

import statistics
import sys
import time

import torch

import consolidator_hf
from consolidator_apps.speed import _probe_layers


def main() -> None:
    torch.set_num_threads(2)
    norm, x, grad, layers = _probe_layers(torch.device("cpu"), 64, 256)
    names = sys.argv[1].split(",") if len(sys.argv) > 1 else list(layers)
    times = {k: [] for k in names}
    for r in range(320):
        for k in names:
            start = time.perf_counter()
            layers[k](norm(x)).backward(grad)
            if r >= 20:
                times[k].append(time.perf_counter() - start)
    print(consolidator_hf.__file__, {k: round(statistics.median(v) * 1e6) for k, v in times.items()})


if __name__ == "__main__":
    main()
