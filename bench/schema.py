"""The config schema: one dataclass per group, the types every composed config is checked against
(bench.config.check_schema). The YAML under configs/ holds the values and documents each key.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class ModelCfg:
    family: str = "biggan"
    ch: int = 32
    d_ch: int = 32
    z_dim: int = 128
    shared_dim: int = 128
    hier: bool = True
    attn: list[int] = field(default_factory=lambda: [16])
    g_sn: bool = True
    d_sn: bool = True
    sn_iters: int = 1
    sn_eps: float = 1e-6
    init: str = "ortho"
    bn_eps: float = 1e-5
    n_classes: Optional[int] = None
    mbdisc: int = 0
    mbdisc_dim: int = 16
    mbstd: int = 0
    vbn: bool = False
    vbn_ref: int = 32
    cross_replica_bn: bool = False


@dataclass
class DataCfg:
    name: str = "shapes"
    shards: str = ""
    resolution: Optional[int] = 32  # null (data=folder): the shards' manifest.json says
    num_samples: int = 10000
    samples_per_shard: int = 500
    num_workers: Any = "auto"  # decode workers per process: auto (bench.workers.resolve_workers) or >= 0
    shuffle_buffer: int = 1000
    mirror: bool = False  # training's real images flipped left-right with p = 1/2; effective size 2 x N


@dataclass
class LossCfg:
    name: str = "hinge"
    clip: float = 0.01
    gp_lambda: float = 10.0
    real_target: float = 1.0
    label_noise: float = 0.0
    feature_matching: float = 0.0


@dataclass
class TrainCfg:
    steps: int = 300
    batch_size: int = 32
    global_batch: Optional[int] = None
    kimg: Optional[float] = None
    accumulate: int = 1
    d_steps: int = 1
    precision: str = "auto"  # auto -> bf16 on CUDA or a CPU with fast bf16, else fp32 (validate resolves it)
    channels_last: str = "auto"
    seed: int = 0
    deterministic: bool = False
    fused_optim: str = "auto"  # auto | true | false (bench.device.optimizer_impl)
    tf32: bool = False
    cudnn_benchmark: bool = False
    compile: str = "false"  # false | default | max-autotune (torch.compile of G and D)
    compile_backend: str = "inductor"  # torch.compile's backend (aot_eager: traced, not code-generated)
    optimizer: str = "adam"
    g_lr: float = 2e-4
    d_lr: float = 4e-4
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])
    eps: float = 1e-6
    tick_every: int = 10
    ckpt_every: int = 100
    ckpt_keep: int = 2
    sample_every: int = 100
    sample_cols: int = 8
    nonfinite_rollback: int = 3
    max_rollbacks: int = 3


@dataclass
class RegCfg:
    r1_gamma: float = 0.0
    r1_every: int = 1
    r2_gamma: float = 0.0
    ortho_beta: float = 0.0
    ortho_full: bool = False
    ortho_nets: list[str] = field(default_factory=lambda: ["G"])
    sigma_clamp: Optional[str] = None
    sigma_clamp_nets: list[str] = field(default_factory=lambda: ["G", "D"])
    sigma_penalty: float = 0.0
    sigma_target: Optional[str] = None
    sigma_penalty_nets: list[str] = field(default_factory=lambda: ["D"])
    hist_avg: float = 0.0
    lecam: float = 0.0
    lecam_decay: float = 0.99
    bcr: list[float] = field(default_factory=lambda: [0.0, 0.0])  # [lambda_real, lambda_fake]
    zcr: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.03])  # [lambda_dis, lambda_gen, sigma]


@dataclass
class AugCfg:
    policy: list[str] = field(default_factory=list)  # empty = off; a string "color,translation" is split
    ada_target: Optional[float] = None  # null = off
    ada_interval: int = 4
    ada_kimg: float = 500.0


@dataclass
class EmaCfg:
    decay: float = 0.99
    start: int = 100


@dataclass
class EvalCfg:
    every: int = 0
    final: Any = "auto"  # auto | true | false; validate resolves auto (config.resolve_final)
    psi_sweep: list = field(default_factory=list)
    num_samples: int = 5000
    extractor: str = "domain"
    weights_path: Optional[str] = None
    best_metric: str = "eval/FID"
    batch_size: int = 64
    standing_stats: int = 0
    truncation: Optional[float] = None
    trunc_mode: str = "resample"
    precision: str = "auto"
    num_real: Optional[int] = None
    cache_dir: Optional[str] = None
    classifier_path: Optional[str] = None
    seed: int = 0
    repeats: int = 1
    intra_fid: bool = False          # intra-class FID (bench/eval/intra.py)
    intra_min_per_class: int = 50    # = bench.eval.intra_check.DEFAULT_MIN_PER_CLASS
    verbose: bool = False
    protocol: str = "domain"         # bench.eval.protocols: domain | biggan | clean
    resize: str = "fidelity"         # fidelity | clean (PIL bicubic to 299, clean-fid's)
    ref_stats: Optional[str] = None  # FID's real side from an npz of mu / sigma (bench.eval.refstats)
    async_: bool = False  # the user's key is eval.async (a Python keyword): renamed below


def _rename_field(cls, old: str, new: str) -> None:
    """Give dataclass field `old` the config key `new`, which Python cannot spell as an attribute (eval.async).
    OmegaConf reads the name from the dataclass's fields; the schema is only merged, never instantiated."""
    f = cls.__dataclass_fields__.pop(old)
    f.name = new
    cls.__dataclass_fields__[new] = f
    cls.__annotations__[new] = cls.__annotations__.pop(old)
    setattr(cls, new, f.default)  # what OmegaConf reads from an instance (getattr accepts any name)


_rename_field(EvalCfg, "async_", "async")


@dataclass
class TelemetryCfg:
    sigma_every: int = 50
    mfu: bool = True
    sigma_k: int = 3
    collapse_sigma_factor: float = 2.0
    collapse_window: int = 50
    collapse_loss_gap: float = 50.0
    collapse_warmup: int = 20
    collapse_fid_factor: float = 1.5
    diversity_every: int = 0
    diversity_samples: int = 32
    collapse_diversity_factor: float = 0.5
    collapse_recall_factor: float = 0.6
    collapse_patience: int = 3
    collapse_dwins_level: float = 0.02   # D wins outright: fake sign mean <= this, real >= 0.9 (or <= this: D dead); 0 = off
    collapse_dwins_ticks: int = 5        # ticks in a row (after the warm-up) that D must win outright; 0 = off
    collapse_class_factor: float = 1.5   # class input ignored: class accuracy <= this x chance (probe or evaluation); 0 = off
    collapse_class_sep: float = 0.25     # the probe's class separation (G's over the data's) <= this, read only for a record without the probe's accuracy (the live probe records both); 0 = off
    collapse_class_after: int = 100      # steps before which the class rule waits (G learns classes late)
    collapse_progress: float = 0.1       # the class and d_wins rules wait while G's distance to the data falls by more than this fraction
    collapse_progress_window: int = 300  # ... over this many steps (the probe's distance; the evaluations' class rule: FID over collapse_patience evaluations)
    collapse_recover_scale: float = 10.0  # a warm-up blow-up is forgiven once loss gap and |D logit means| are <= this; 0 = off
    collapse_recover_ticks: int = 5      # ticks after the warm-up the blow-up has to recover in
    collapse_logit_scale: float = 50.0   # flag |D's mean real / fake logit| above this after the warm-up; 0 = off
    stop_on_collapse: bool = False


@dataclass
class LogCfg:
    backends: list[str] = field(default_factory=lambda: ["tb"])  # tb | mlflow | wandb (bench/train/loggers.py)
    project: str = "gan-bench"        # the MLflow experiment / W&B project
    mlflow_uri: Optional[str] = None  # null: a file store in RUN/mlruns


@dataclass
class ThroughputCfg:
    warmup: int = 3
    steps: int = 10
    repeats: int = 3
    data: str = "fake"
    profile: Optional[str] = None


@dataclass
class ClusterCfg:
    partition: str = "debug"
    nodes: int = 1
    gpus_per_node: int = 0
    tasks_per_node: int = 1
    cpus_per_task: int = 1
    mem: str = "2G"
    time: str = "60"
    account: Optional[str] = None
    qos: Optional[str] = None
    setup: list[str] = field(default_factory=list)
    max_requeue: int = 3
    signal_delay_s: int = 30
    array_parallelism: int = 4
    link_gbps: float = 100.0  # a node's inter-node bandwidth, Gb/s (bench inspect's scaling projection)


@dataclass
class DistCfg:
    timeout_s: int = 300
    rank0_timeout_s: int = 21600
    grad_sync: str = "overlap"
    bucket_mb: Optional[float] = None


@dataclass
class RunCfg:
    dir: str = ""
    root: str = "runs"
    name: str = ""
    dry_run: bool = False


@dataclass
class SuiteCfg:
    """The labelled collapse suite (configs/experiment/collapse_suite.yaml; judged by scripts/collapse_suite.py).
    Training ignores these keys: they say what a suite run was meant to show and carry, inside its config.yaml,
    the rule written down before it ran that decides from its final samples whether it collapsed."""
    cell: str = ""                   # the suite cell (configs/collapse_cell/<cell>.yaml); "" = not a suite run
    intent: str = ""                 # collapse | healthy: what the cell's recipe is meant to do (shown, decides nothing)
    truth_chance_factor: float = 1.5  # collapsed if the final eval/class_acc <= this x chance (the class input ignored)
    truth_diversity_floor: float = 0.5  # ... or the final per-class diversity over the data's <= this (mode collapse)
    truth_fid_ceil: float = 100.0    # ... or the final domain FID >= this (far from the data); or diverged / no checkpoint
    truth_samples: int = 1000        # generated images of the final evaluation that decides


@dataclass
class Config:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    reg: RegCfg = field(default_factory=RegCfg)
    aug: AugCfg = field(default_factory=AugCfg)
    ema: EmaCfg = field(default_factory=EmaCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    telemetry: TelemetryCfg = field(default_factory=TelemetryCfg)
    log: LogCfg = field(default_factory=LogCfg)
    cluster: ClusterCfg = field(default_factory=ClusterCfg)
    dist: DistCfg = field(default_factory=DistCfg)
    throughput: ThroughputCfg = field(default_factory=ThroughputCfg)
    run: RunCfg = field(default_factory=RunCfg)
    suite: SuiteCfg = field(default_factory=SuiteCfg)
