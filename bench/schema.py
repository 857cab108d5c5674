"""The config schema: one dataclass per group, each key's type, default and one-line comment, declared once.
configs/*.yaml are presets that override these (bench.config.compose puts the defaults under them);
bench.config.validate checks the ranges, bench.config.resolve derives what `auto` and friends mean.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Optional

POSITIVE, NON_NEGATIVE = "> 0", ">= 0"  # a field's range, checked by bench.config.check_ranges


def ranged(default, rule: str):
    """A field whose value must be `rule` (POSITIVE or NON_NEGATIVE); null passes where the type is Optional."""
    return field(default=default, metadata={"range": rule})


def typed(node, group: type):
    """The config group `node` (a DictConfig or a dict) as an instance of its dataclass here (`typed(cfg.reg,
    RegCfg)`): each value of the type this schema declares; keys it does not declare (a `_target_` loss's own) are
    left out. The one conversion for the parts that take typed settings (GANObjective, WeightRegs)."""
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    known = {f.name for f in fields(group)}
    node = OmegaConf.merge(OmegaConf.structured(group), {k: v for k, v in plain.items() if k in known})
    return OmegaConf.to_object(node)


@dataclass
class ModelCfg:
    """The nets (configs/model/*.yaml are presets: biggan, biggan_128, dcgan_sn, ...)."""
    family: str = "biggan"  # biggan | biggan_deep | sagan | dcgan (bench.registry.MODELS); or model._target_, your
    #   own builder
    ch: int = 32  # G width multiplier
    d_ch: int = 32  # D width multiplier
    z_dim: int = 128  # latent size (split across blocks when hier)
    shared_dim: int = 128  # shared class embedding; 0 = per-BN class embeddings
    hier: bool = True  # hierarchical latent
    attn: list[int] = field(default_factory=lambda: [16])  # resolutions with self-attention; [] = none
    g_sn: bool = True  # spectral norm in G
    d_sn: bool = True  # spectral norm in D
    sn_iters: int = 1  # power iterations per forward
    sn_eps: float = 1e-6  # spectral norm: eps in the power iteration's normalisation
    init: str = "ortho"  # ortho | N02 | xavier
    bn_eps: float = 1e-5  # BatchNorm eps
    n_classes: Optional[int] = ranged(None, POSITIVE)  # class-embedding rows; null = the dataset's class count
    mbdisc: int = ranged(0, NON_NEGATIVE)  # minibatch-discrimination kernels before D's output (Salimans et al.); 0 =
    #   off
    mbdisc_dim: int = 16  # size of each minibatch-discrimination kernel
    mbstd: int = ranged(0, NON_NEGATIVE)  # minibatch-stddev group size in D; 0 = off
    vbn: bool = False  # virtual batch norm in G (reference batch fixed at the start)
    vbn_ref: int = 32  # reference-batch size for vbn (extra samples per G forward)
    cross_replica_bn: bool = False  # synchronise G's BatchNorm statistics across ranks (BigGAN)


@dataclass
class DataCfg:
    """The training data (presets: data=shapes, the built-in set; data=folder, your shards)."""
    name: str = "shapes"  # shapes (the built-in set, written on first use) | folder (your shards: data=folder
    #   data.shards=DIR)
    shards: str = ""  # shard directory / pattern; "" = the built-in dataset's cached shards
    resolution: Optional[int] = 32  # image side in pixels; null (data=folder): the shards' manifest.json says
    num_samples: int = 10000  # size of the built-in dataset when it is created
    samples_per_shard: int = ranged(500, POSITIVE)  # the built-in dataset: samples per .tar shard when it is written
    num_workers: Any = "auto"  # decode workers per process: auto = half this process's cores, 1 to 4; 0 = decode on
    #   the training thread
    shuffle_buffer: int = ranged(1000, NON_NEGATIVE)  # samples in the shuffle buffer
    mirror: bool = False  # true: each real image drawn for training is flipped left-right with p = 1/2 (effective
    #   size 2 x N)


@dataclass
class LossCfg:
    """The adversarial loss (presets: configs/loss/*.yaml)."""
    name: str = "hinge"  # hinge | ns | minimax | wgan | wgan_gp | rpgan (bench.registry.LOSSES); or loss._target_
    clip: float = ranged(0.01, POSITIVE)  # wgan only: D weights clipped to [-clip, clip]
    gp_lambda: float = ranged(10.0, NON_NEGATIVE)  # wgan_gp only: gradient-penalty weight
    real_target: float = 1.0  # logistic losses (ns, minimax): D's target on real data; 0.9 = one-sided label
    #   smoothing
    label_noise: float = 0.0  # logistic losses: probability of flipping each of D's real/fake targets; 0 = off
    feature_matching: float = ranged(0.0, NON_NEGATIVE)  # weight of G's feature-matching term (mean D features, real
    #   vs fake); 0 = off


@dataclass
class TrainCfg:
    """Training loop knobs. Units in the comments; "off" says how to disable."""
    steps: int = ranged(300, POSITIVE)  # G steps to run (one G step = d_steps D steps + 1 G step)
    batch_size: int = ranged(32, POSITIVE)  # images per process per micro-batch
    global_batch: Optional[int] = ranged(None, POSITIVE)  # optional: effective batch; sets batch_size = global_batch
    #   / (processes x accumulate), which must divide
    kimg: Optional[float] = ranged(None, POSITIVE)  # optional: train for this many thousand images; sets steps =
    #   ceil(kimg * 1000 / effective batch)
    accumulate: int = ranged(1, POSITIVE)  # micro-batches per optimiser step
    d_steps: int = ranged(1, POSITIVE)  # D steps per G step
    precision: str = "auto"  # auto = bf16 on CUDA or a CPU with fast bf16 (AMX / AVX512-BF16), else fp32 (resolve()
    #   decides; config.yaml records the result) | bf16 | fp32 | fp16 (GPU only)
    channels_last: str = "auto"  # auto = on when it is faster (bf16 on CPU with AMX/AVX-512, any CUDA) | true | false
    seed: int = 0  # weights' initialisation, data order and latents; runs that share it are paired seeds
    deterministic: bool = False  # torch deterministic algorithms; a resumed run then matches an uninterrupted one bit
    #   for bit
    fused_optim: str = "auto"  # the optimiser step's kernels: true = one fused kernel per step where torch has one
    #   for this optimiser and device (Adam, AdamW, SGD; Adagrad on CPU), else foreach | false = torch's loop over
    #   tensors | auto = true (Adam's step 4x faster fused on a CPU, the training step within noise: README,
    #   Throughput); run.json records the kernels used
    tf32: bool = False  # CUDA: TF32 tensor cores for fp32 matmuls and cuDNN convolutions (Ampere and later; ~10
    #   mantissa bits). false = fp32 means fp32 (torch's own default leaves cuDNN's on); no effect on CPU or in bf16
    #   autocast regions
    cudnn_benchmark: bool = False  # CUDA: let cuDNN time its convolution algorithms on the first step of each shape
    #   and keep the fastest (a GAN's shapes are fixed); the choice may differ between runs, so results are not bit-
    #   reproducible; no effect on CPU
    compile: str = "false"  # torch.compile G and D, each on its own (nn.Module.compile: same parameters, state dicts
    #   and checkpoints): false | default | max-autotune (inductor's mode). The first step then compiles (minutes on a
    #   CPU; run.json: compile_s, graphs, graph breaks). Not with R1 / R2 / WGAN-GP (their double backward does not go
    #   through compiled graphs). Measured on a 2-core CPU (README, Throughput): no gain in bf16, 8% in fp32, ~96 s to
    #   compile; hence false
    compile_backend: str = "inductor"  # torch.compile's backend: inductor (generates kernels) | aot_eager (traces and
    #   runs the same ops: a quick check that a net compiles) | eager
    optimizer: str = "adam"  # adam | rmsprop
    g_lr: float = ranged(2e-4, POSITIVE)  # generator learning rate (TTUR: D faster than G)
    d_lr: float = ranged(4e-4, POSITIVE)  # discriminator learning rate
    betas: list[float] = field(default_factory=lambda: [0.0, 0.999])  # Adam betas
    eps: float = ranged(1e-6, POSITIVE)  # Adam / RMSProp eps
    tick_every: int = ranged(10, POSITIVE)  # steps per metrics line (one all-reduce per tick)
    ckpt_every: int = ranged(100, NON_NEGATIVE)  # steps between checkpoints; 0 = only at the end
    ckpt_keep: int = ranged(2, POSITIVE)  # newest complete checkpoints kept
    sample_every: int = ranged(100, NON_NEGATIVE)  # steps between sample grids; 0 = only at the end
    sample_cols: int = ranged(8, POSITIVE)  # samples per class row in the grid
    nonfinite_rollback: int = ranged(3, NON_NEGATIVE)  # consecutive non-finite (skipped) steps before rolling back to
    #   the last good checkpoint; 0 = never
    max_rollbacks: int = ranged(3, NON_NEGATIVE)  # rollbacks before the run is declared diverged and stops


@dataclass
class RegCfg:
    """Regularisers. 0 / null = off."""
    r1_gamma: float = ranged(0.0, NON_NEGATIVE)  # R1 = gamma/2 * E_real ||grad_x D(x)||^2; 0 = off
    r1_every: int = ranged(1, POSITIVE)  # lazy interval in D steps (the penalty is scaled by the interval)
    r2_gamma: float = ranged(0.0, NON_NEGATIVE)  # R2 = gamma/2 * E_fake ||grad_x D(x)||^2 (zero-centred on fakes,
    #   same lazy interval); 0 = off
    ortho_beta: float = ranged(0.0, NON_NEGATIVE)  # orthogonal regularisation strength (BigGAN form); 0 = off
    ortho_full: bool = False  # true: ||W^T W - I||^2 instead of BigGAN's off-diagonal form
    ortho_nets: list[str] = field(default_factory=lambda: ["G"])  # nets the orthogonal penalty applies to (the shared
    #   class embedding is always excluded)
    sigma_clamp: Optional[str] = None  # null = off; a number = clamp sigma0 to it; "ratio:R" = clamp to R *
    #   sg(sigma1)
    sigma_clamp_nets: list[str] = field(default_factory=lambda: ["G", "D"])  # nets whose layers are clamped after
    #   each optimiser step
    sigma_penalty: float = ranged(0.0, NON_NEGATIVE)  # weight of the sigma0 penalty toward reg.sigma_target; 0 = off
    sigma_target: Optional[str] = None  # a number, or "ratio:R" = R * sg(sigma1)
    sigma_penalty_nets: list[str] = field(default_factory=lambda: ["D"])  # the nets sigma_penalty applies to (G, D)
    hist_avg: float = ranged(0.0, NON_NEGATIVE)  # historical averaging weight: ||theta - running mean of past
    #   theta||^2; 0 = off
    lecam: float = ranged(0.0, NON_NEGATIVE)  # LeCam (Tseng et al. 2021) weight on E(D(x) - a_F)^2 + E(D(G(z)) -
    #   a_R)^2, added to D's loss, a_R / a_F = EMA anchors of the mean real / fake D output (logits); 0 = off (paper:
    #   0.3)
    lecam_decay: float = 0.99  # the anchors' EMA decay per D step (averaged over ranks); in [0, 1)
    bcr: list[float] = field(default_factory=lambda: [0.0, 0.0])  # balanced consistency reg. (Zhao et al. 2021)
    #   [lambda_real, lambda_fake]: lambda E(D(x) - D(T(x)))^2 on reals / fakes, T = random flip + translation (1/8 of
    #   the size), applied to the images D's loss saw; 0 = off (paper: [10, 10])
    zcr: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.03])  # latent consistency reg. [lambda_dis,
    #   lambda_gen, sigma], z' = z + N(0, sigma^2): D: lambda_dis E(D(G(z)) - D(G(z')))^2; G: -lambda_gen x mean per
    #   pixel (G(z) - G(z'))^2; lambdas 0 = off (paper: [5, 0.5, 0.03]); sigma (latent units) > 0


@dataclass
class AugCfg:
    """Augmentation of D's inputs (bench/train/augment.py). Empty policy / null target = off."""
    policy: list[str] = field(default_factory=list)  # DiffAugment ops (Zhao et al. 2020) applied to real and fake
    #   images before D, in the D and the G phase: any of [color, translation, cutout]; [] = off. color: brightness
    #   +U(-0.5,0.5), saturation xU(0,2), contrast xU(0.5,1.5); translation: up to 1/8 of the size, zero padding;
    #   cutout: a zeroed square of half the size. Also aug.policy='color,translation' (quoted).
    ada_target: Optional[float] = None  # ADA (Karras et al. 2020): target of r_t = E[sign D(real)]; each op of
    #   aug.policy is applied to each sample with probability p, moved to keep r_t near it (paper: 0.6); null = off
    #   (every op on every sample, p = 1)
    ada_interval: int = ranged(4, POSITIVE)  # D steps between updates of p (r_t is measured over them, across all
    #   ranks)
    ada_kimg: float = ranged(500.0, POSITIVE)  # how fast p moves: p can go from 0 to 1 in this many thousand images
    #   (kimg), i.e. each update moves p by (images in the interval) / (ada_kimg * 1000)


@dataclass
class EmaCfg:
    """Exponential moving average of G's weights (the G that samples and evaluations use)."""
    decay: float = 0.99  # per G step (half-life ~69 steps); 0 = EMA copies G. BigGAN-128 uses 0.9999
    start: int = ranged(100, NON_NEGATIVE)  # G steps before averaging starts (until then the EMA copies G)


@dataclass
class EvalCfg:
    """Evaluation: IS, FID (float64), KID, precision/recall, density/coverage; class accuracy with the domain
    extractor."""
    every: int = ranged(0, NON_NEGATIVE)  # steps between evaluations during training; 0 = off (bench eval run=DIR
    #   evaluates later)
    final: Any = "auto"  # also evaluate once when training ends (implied by every > 0), and print its quality line
    #   (class accuracy, FID): auto = on for the built-in shapes set (the main job), off on your shards (the domain
    #   extractor trains a classifier on them first) | true | false
    psi_sweep: list = field(default_factory=list)  # after training, a truncation sweep over these psi (as bench
    #   truncation); [] = none
    num_samples: int = 5000  # generated images per evaluation (the real side uses as many, read from the shards)
    extractor: str = "domain"  # domain (CNN trained on the shards; offline) | inception (needs eval.weights_path)
    weights_path: Optional[str] = None  # the standard Inception weights file (pt_inception-2015-12-05-6726825d.pth)
    #   for extractor=inception
    best_metric: str = "eval/FID"  # the best checkpoint (checkpoints/best.pt) is chosen by this metric (also
    #   eval/KID, eval/density, eval/coverage, ...)
    batch_size: int = ranged(64, POSITIVE)  # generation / feature batch
    standing_stats: int = ranged(0, NON_NEGATIVE)  # forward passes to recompute G's BatchNorm statistics before
    #   sampling; 0 = off
    truncation: Optional[float] = ranged(None, POSITIVE)  # psi for the truncated normal; null = none
    trunc_mode: str = "resample"  # resample (values with |z| > psi redrawn, BigGAN) | clip | scale
    precision: str = "auto"  # generation precision: auto | bf16 | fp32
    num_real: Optional[int] = None  # real images for the statistics; null = num_samples
    cache_dir: Optional[str] = None  # real-statistics cache; null = $GAN_BENCH_CACHE or ~/.cache/gan-bench
    classifier_path: Optional[str] = None  # domain classifier file; null = beside the shards (trained on first use)
    seed: int = 0  # latents and labels of the (first) sample set
    repeats: int = 1  # K >= 1 independent sample sets per evaluation (seeds seed .. seed+K-1, the real side shared
    #   and cached); the record keeps each one's values (repeat_values), their mean as eval/<metric> and a 95%
    #   bootstrap interval eval/<metric>_ci95; costs K x the sampling and features
    intra_fid: bool = False  # also intra-class FID: each class's generated samples against that class's real images
    #   (same features, no second extraction), mean over classes as eval/intra_FID; per class in intra_fid_per_class
    #   and intra_fid_counts ({class: [generated, real]}). Costs one Frechet distance (a D x D eigendecomposition) per
    #   class and sample set: negligible for the domain extractor (D = 128), about a second per class for Inception (D
    #   = 2048)
    intra_min_per_class: int = 50  # intra_fid: samples per class on each side; eval.num_samples and eval.num_real
    #   (null = num_samples) must be >= intra_min_per_class x classes (checked before anything runs); >= 2
    verbose: bool = False  # also torch-fidelity's own prints (its progress bars, "Recall: ..."); gan-bench's progress
    #   lines show either way
    protocol: str = "domain"  # domain (these keys as set) | biggan (Inception, 50k samples, no truncation, 16
    #   standing-stat passes, fp32) | clean (biggan + eval.resize=clean); bench/eval/protocols.py
    resize: str = "fidelity"  # images to Inception's 299: fidelity (torch-fidelity's TF1 bilinear) | clean (PIL
    #   bicubic on uint8, clean-fid's; extractor=inception)
    ref_stats: Optional[str] = None  # FID's real side from this npz (mu, sigma: `bench eval stats`, BigGAN-PyTorch's
    #   inception moments, TTUR / clean-fid stats); KID / PR / DC / intra-FID are then skipped
    async_: bool = False  # true: `bench train` evaluates in its own job beside training (`bench eval watch`): each
    #   new checkpoint as it appears, every eval.every steps; training itself then never stops to evaluate (the key is
    #   eval.async, a Python keyword: renamed below)


def _rename_field(cls, old: str, new: str) -> None:
    """Give dataclass field `old` the config key `new`, which Python cannot spell as an attribute (eval.async).
    OmegaConf reads the name from the dataclass's fields; EvalCfg is only merged, never instantiated (not typed())."""
    f = cls.__dataclass_fields__.pop(old)
    f.name = new
    cls.__dataclass_fields__[new] = f
    cls.__annotations__[new] = cls.__annotations__.pop(old)
    setattr(cls, new, f.default)  # what OmegaConf reads from an instance (getattr accepts any name)


_rename_field(EvalCfg, "async_", "async")


@dataclass
class TelemetryCfg:
    """Stability telemetry and the collapse detector's rules (bench/train/collapse.py)."""
    sigma_every: int = ranged(50, NON_NEGATIVE)  # steps between singular-value measurements; 0 = off
    mfu: bool = True  # perf/tflops and perf/mfu per tick (FLOPs counted once, peak from the GPU table or a cached CPU
    #   matmul)
    sigma_k: int = ranged(3, POSITIVE)  # singular values tracked per layer (s0, s1, s2)
    collapse_sigma_factor: float = 2.0  # flag collapse when D's largest sigma0 exceeds this factor x its minimum over
    #   the window
    collapse_window: int = ranged(50, POSITIVE)  # steps the sigma jump is judged over
    collapse_loss_gap: float = ranged(50.0, POSITIVE)  # flag when |loss/G - loss/D| exceeds this (healthy
    #   hinge/logistic losses stay within a few units; off for wgan/wgan_gp)
    collapse_warmup: int = ranged(20, NON_NEGATIVE)  # steps at the start where only non-finite values are flagged
    collapse_fid_factor: float = 1.5  # flag when an evaluation's FID exceeds this factor x the best FID so far
    diversity_every: int = ranged(0, NON_NEGATIVE)  # steps between diversity measurements (stability/diversity: mean
    #   pairwise distance of G_ema's samples for fixed z per class in the domain classifier's features / the same for
    #   real images; 1 = as diverse as the data); 0 = off (the default: a measurement is 320 G and classifier forwards
    #   inside the step, its time counted in img/s; e.g. 100 to catch partial mode collapse). Needs the domain
    #   classifier: trained before the first step when it is missing (bench/train/loop.py, _prepare_classifier)
    diversity_samples: int = ranged(32, POSITIVE)  # fixed latents (and real images) per class for stability/diversity
    #   (at most 32 classes are measured)
    collapse_diversity_factor: float = 0.5  # flag when stability/diversity stays below this factor x its best so far
    #   (collapse_patience times); 0 = off
    collapse_recall_factor: float = 0.6  # flag when an evaluation's recall stays below this factor x the best recall
    #   so far (collapse_patience times); 0 = off
    collapse_patience: int = ranged(3, POSITIVE)  # measurements / evaluations in a row below the line before the
    #   diversity / recall rule fires
    collapse_dwins_level: float = 0.02  # D wins outright: D/fake_sign_mean (share of fakes D calls real) <= this
    #   while D/real_sign_mean >= 0.9; 0 = off
    collapse_dwins_ticks: int = ranged(5, NON_NEGATIVE)  # ... at this many ticks in a row after the warm-up (d_wins;
    #   with both sign means <= the level: d_dead, D rejects everything; off for wgan/wgan_gp)
    collapse_class_factor: float = 1.5  # class input ignored: the probe's or an evaluation's class accuracy <= this x
    #   chance (probe: collapse_patience in a row); 0 = off
    collapse_class_sep: float = 0.25  # the probe's class separation (distance between class mean features / within-
    #   class spread, G's over the data's) <= this, read only for a record without the probe's accuracy (the live
    #   probe records both, and the accuracy decides); 0 = off
    collapse_class_after: int = ranged(100, NON_NEGATIVE)  # steps before the class rule looks (an early G has not
    #   learnt the classes yet)
    collapse_progress: float = 0.1  # the class and d_wins rules wait while G still closes in on the data: the probe's
    #   stability/probe_fd fell by more than this fraction over the last collapse_progress_window steps (the
    #   evaluations' class rule: eval/FID over the last collapse_patience evaluations); 0 = off
    collapse_progress_window: int = ranged(300, NON_NEGATIVE)  # steps the probe's progress is judged over; with the
    #   probe on, those rules wait until the run is this old
    collapse_recover_scale: float = 10.0  # a blow-up in the warm-up (loss gap or |D logit mean| > collapse_loss_gap)
    #   is forgiven once all are <= this; 0 = off
    collapse_recover_ticks: int = ranged(5, NON_NEGATIVE)  # ... within this many ticks after the warm-up, else
    #   flagged (warmup_blowup)
    collapse_logit_scale: float = 50.0  # flag |D/real_logit_mean| or |D/fake_logit_mean| above this after the warm-up
    #   (hinge losses clamp; off for wgan/wgan_gp); 0 = off
    stop_on_collapse: bool = False  # checkpoint and stop at the first collapse


@dataclass
class LogCfg:
    """Mirrors of the run's records (bench/train/loggers.py); metrics.jsonl, evals.jsonl and samples/ are always
    written, these are views of the same numbers."""
    backends: list[str] = field(default_factory=lambda: ["tb"])  # any of: tb (TensorBoard, RUN/tb: tensorboard
    #   --logdir RUN/tb), mlflow (a file store in RUN/mlruns: mlflow ui --backend-store-uri RUN/mlruns; pip install
    #   'gan-bench[mlflow]'), wandb (an offline run in RUN/wandb: wandb sync RUN/wandb/offline-run-*; pip install
    #   'gan-bench[wandb]'); [] = none. A backend that fails during the run is dropped with one warning; training goes
    #   on
    project: str = "gan-bench"  # the MLflow experiment and the W&B project the run is logged under
    mlflow_uri: Optional[str] = None  # null = the file store in RUN/mlruns; or an MLflow tracking URI
    #   (sqlite:///path/mlflow.db, http://host:5000)


@dataclass
class ThroughputCfg:
    """`bench throughput`."""
    warmup: int = ranged(3, NON_NEGATIVE)  # burn-in G steps (not timed)
    steps: int = ranged(10, POSITIVE)  # timed G steps per window
    repeats: int = ranged(3, POSITIVE)  # timed windows; the median window is reported (a busy neighbour only slows
    #   some)
    data: str = "fake"  # fake (random tensors, no decode) | shards (the real read pipeline)
    profile: Optional[str] = None  # a folder: one more window under torch.profiler -> ops.txt (self time by op) +
    #   trace.json


@dataclass
class ClusterCfg:
    """Slurm / submitit resources (presets: cluster=local, the test cluster; cluster=example_gpu)."""
    partition: str = "debug"  # Slurm partition (sbatch -p)
    nodes: int = ranged(1, POSITIVE)  # nodes per job
    gpus_per_node: int = ranged(0, NON_NEGATIVE)  # GPUs per node; one rank per GPU when > 0 (tasks_per_node follows
    #   it)
    tasks_per_node: int = ranged(1, POSITIVE)  # ranks per node (one torch.distributed rank per Slurm task)
    cpus_per_task: int = ranged(1, POSITIVE)  # CPU cores per rank (also data.num_workers + 1 is a good value)
    mem: str = "2G"  # memory per node: 500M, 4G, 1T
    time: str = "60"  # wall-clock limit: minutes, or HH:MM:SS
    account: Optional[str] = None  # sbatch --account
    qos: Optional[str] = None  # sbatch --qos
    setup: list[str] = field(default_factory=list)  # shell lines run before the job starts (module load ..., source
    #   venv/bin/activate)
    max_requeue: int = ranged(3, NON_NEGATIVE)  # times a job is requeued after preemption or timeout (> 0 keeps
    #   timeouts alive)
    signal_delay_s: int = ranged(30, NON_NEGATIVE)  # seconds before the time limit at which the job is told to
    #   checkpoint and requeue
    array_parallelism: int = ranged(4, POSITIVE)  # jobs of a sweep's array that run at once
    link_gbps: float = ranged(100.0, POSITIVE)  # a node's inter-node bandwidth in Gb/s, all its NICs together (> 0);
    #   only bench inspect's scaling projection reads it (bench/scaling.py)


@dataclass
class DistCfg:
    """Several processes (torch.distributed)."""
    timeout_s: int = ranged(300, POSITIVE)  # seconds a rank waits in a collective for the others: a rank that failed
    #   or hangs ends every rank within this time (the process-group timeout; torch's default is 30 min with gloo)
    rank0_timeout_s: int = ranged(21600, POSITIVE)  # seconds the other ranks wait for work only rank 0 does (an
    #   evaluation, a checkpoint, the built-in dataset): keep it above your longest evaluation; a failure in that work
    #   reaches every rank at once whatever this is
    grad_sync: str = "overlap"  # how a phase's gradients are averaged over ranks: overlap = in buckets of about
    #   bucket_mb, each all-reduced as soon as backward has produced all of its gradients (hidden behind the rest of
    #   backward); flat = one buffer after backward (nothing hidden; kept for comparison)
    bucket_mb: Optional[float] = ranged(None, POSITIVE)  # overlap: bucket size in MiB; null = per net, an eighth of
    #   its gradients, between 0.25 and 25 (25 MiB is DDP's default; a small net still gets several buckets). Smaller
    #   starts sending earlier; larger sends fewer messages (each pays the network's latency)


@dataclass
class RunCfg:
    """The run directory."""
    dir: str = ""  # run directory; "" = runs/<readable name>-<hash of the override delta>
    root: str = "runs"  # parent of generated run directories
    name: str = ""  # readable prefix of the generated name; "" = <model>-<data><res>
    dry_run: bool = False  # print the resolved config and the run directory, then exit


@dataclass
class SuiteCfg:
    """The labelled collapse suite (configs/experiment/collapse_suite.yaml; judged by scripts/collapse_suite.py).
    Training ignores these keys: they say what a suite run was meant to show and carry, inside its config.yaml,
    the rule written down before it ran that decides from its final samples whether it collapsed."""
    cell: str = ""                   # the suite cell (configs/collapse_cell/<cell>.yaml); "" = not a suite run
    intent: str = ""                 # collapse | healthy: what the cell's recipe is meant to do (shown, decides
    #   nothing)
    truth_chance_factor: float = ranged(1.5, POSITIVE)  # collapsed if the final eval/class_acc <= this x chance (the
    #   class input ignored)
    truth_diversity_floor: float = ranged(0.5, POSITIVE)  # ... or the final per-class diversity over the data's <=
    #   this (mode collapse)
    truth_fid_ceil: float = ranged(100.0  , POSITIVE)  # ... or the final domain FID >= this (far from the data); or
    #   diverged / no checkpoint
    truth_samples: int = ranged(1000      , POSITIVE)  # generated images of the final evaluation that decides


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
