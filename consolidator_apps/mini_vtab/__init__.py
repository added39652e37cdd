"""mini-VTAB: a small real-data benchmark in the VTAB-1k protocol that runs offline on a CPU.

- :mod:`.sources`: Fashion-MNIST idx files and scikit-learn's digits, read offline;
- :mod:`.tasks`: deterministic target tasks written in the VTAB-1k on-disk format;
- :mod:`.backbone`: the small ViT pretrained on Fashion-MNIST that stands in for ViT-B/16 IN-21k;
- :mod:`.benchmark`: every method on every task through ``consolidator_hf.training.run_finetune``
  (grid on val200, retrain on train800val200, test per seed) and the report.
"""

from .backbone import (
    PretrainConfig,
    default_backbone_dir,
    ensure_backbone,
    pretrain_backbone,
    read_pretrain_info,
)
from .benchmark import (
    BenchmarkConfig,
    MethodSpec,
    PriorReport,
    default_methods,
    read_report,
    run_benchmark,
    summarize,
    write_report,
)
from .sources import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_DIR,
    export_fashion_mnist_idx,
    fetch_fashion_mnist,
    fashion_mnist_dir,
    load_digits_images,
    load_fashion_mnist,
    read_idx,
    write_idx,
)
from .tasks import (
    TASKS,
    MiniTask,
    generate_task,
    generate_tasks,
    get_task,
    task_names,
)

__all__ = [
    "BenchmarkConfig",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_DIR",
    "MethodSpec",
    "MiniTask",
    "PretrainConfig",
    "PriorReport",
    "TASKS",
    "default_backbone_dir",
    "default_methods",
    "export_fashion_mnist_idx",
    "fashion_mnist_dir",
    "fetch_fashion_mnist",
    "ensure_backbone",
    "generate_task",
    "generate_tasks",
    "get_task",
    "load_digits_images",
    "load_fashion_mnist",
    "pretrain_backbone",
    "read_idx",
    "read_pretrain_info",
    "read_report",
    "run_benchmark",
    "summarize",
    "task_names",
    "write_idx",
    "write_report",
]
