"""Base config: ResNet-18 + CAS, PGD-AT on CIFAR-10, as in the paper (section 5.1).

Every setting file imports this and changes a few fields; every value can be overridden on
the command line, e.g. `--config.optim.lr=0.05 --config.model.cas_stages="(3, 4)"`.
"""
import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """The paper's AT+CAS ResNet-18 CIFAR-10 setting."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  config.data = ml_collections.ConfigDict()
  config.data.source = "tfds"  # "tfds" | "cifar_dir" | "synthetic"
  config.data.dataset = "cifar10"  # "cifar10" | "cifar100" | "svhn_cropped"
  config.data.cifar_dir = ""  # a folder in the official python layout, for source="cifar_dir"
  config.data.tfds_data_dir = ""
  config.data.tfds_download = True  # let TFDS download and prepare the dataset on first use
  config.data.num_train = 0  # 0 = all
  config.data.num_test = 0
  config.data.num_classes = 10
  config.data.image_size = 32
  config.data.synthetic_num_train = 512
  config.data.synthetic_num_test = 128
  config.data.augment = True  # pad-4 random crop + horizontal flip

  config.batch_size = 128  # global, split over devices and hosts
  config.eval_batch_size = 256

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet18"  # resnet18 | resnet34 | wrn34_10 | wrn | vgg16
  config.model.width = 0  # 0 = the architecture's full width (ResNet/VGG first-stage width)
  config.model.cas_stages = "default"  # "default" | "none" | e.g. "3,4" (ResNet stages)
  config.model.cas_suppress = True  # False: Table 2's "CAS loss without suppressing"
  config.model.dtype = "float32"  # "bfloat16" on GPU/TPU for speed
  # Table 1 baselines (ResNets; cas_jax/models/baselines.py), chosen by config.baseline.
  config.model.kwta_ratio = 0.2  # kWTA: keep the top 20% of each activation layer (the paper)
  config.model.sap_ratio = 1.0  # SAP: samples drawn per layer, as a fraction of its activations
  config.model.pcl_dim = 256  # PCL: features of the stage-3 branch (the stage-4 one: 8 x width)
  config.baseline = "none"  # "none" | "kwta" | "sap" | "pcl"

  config.loss = ml_collections.ConfigDict()
  config.loss.objective = "at"  # "natural" | "at" | "trades" | "mart"
  config.loss.beta = 2.0  # CAS loss weight (ResNet-18 and WRN: 2, VGG16: 3)
  config.loss.lam = 6.0  # TRADES / MART lambda
  config.loss.pcl_weight = 1.0  # baseline "pcl": CE + pcl_weight * sum of the branches' PCL
  config.loss.pcl_warmup_epochs = 10  # baseline "pcl": epochs of CE alone before the PCL term

  # Training adversaries (paper section 5.1: PGD-10, eps 8/255, step 2/255, uniform start).
  config.attack = ml_collections.ConfigDict()
  config.attack.norm = "linf"  # "linf" | "l2" (eps and step_size in the norm's units)
  config.attack.eps = 8 / 255
  config.attack.step_size = 2 / 255
  config.attack.steps = 10
  config.attack.start = "uniform"  # "uniform" (AT) | "normal" (TRADES / MART: x + 0.001 N(0,1))
  config.attack.batch_norm = "running"  # "running" (CAS code) | "batch" (batch stats, no update)

  config.optim = ml_collections.ConfigDict()
  config.optim.lr = 0.1
  config.optim.momentum = 0.9
  config.optim.weight_decay = 2e-4  # the released AT script uses 1e-4
  config.optim.nesterov = False

  config.schedule = ml_collections.ConfigDict()
  config.schedule.num_epochs = 120  # the scripts; the paper text says 200
  config.schedule.milestones = (75, 90)  # the first epochs at lr * gamma (1-indexed)
  config.schedule.gamma = 0.1

  # Evaluation during training: natural and adaptive PGD-20 accuracy.
  config.eval = ml_collections.ConfigDict()
  config.eval.every_epochs = 1
  config.eval.num_images = 1000  # 0 = the whole test set
  config.eval.norm = "linf"  # the threat model of eval.eps and the reports: linf | l2 | l1
  config.eval.eps = 8 / 255  # in the norm's units (L2 0.5, L1 12 are the usual)
  config.eval.steps = 20
  config.eval.step_size = 0.0  # 0 = eps / 10, the paper's protocol
  config.eval.loss = "joint_ce"  # adaptive: CE + beta * mean CE of the CAS heads
  # Robustness reports (--mode=eval, cas_jax/evaluation/evaluate.py), at config.eval.eps.
  config.eval.report_images = 1000  # first test images; 0 = the whole test set
  config.eval.attacks = "default"  # names of cas_jax/evaluation/attack_registry.py, comma-separated
  config.eval.checkpoints = "last,best"  # which workdir checkpoints to evaluate
  config.eval.torch_checkpoint = ""  # a .pth of the authors' layout instead (model.name)
  config.eval.exact_per_attack = False  # True: expensive attacks on every clean-correct image
  config.eval.exact_autoattack = True  # AutoAttack on every clean-correct image (exact figure)
  config.eval.progress = True  # a tqdm bar per attack stage (quiet when not a terminal)
  # The dtype the reports attack and judge in (a bfloat16-trained model is evaluated in
  # float32 too); "" = the training dtype, config.model.dtype.
  config.eval.dtype = "float32"
  config.eval.transfer_checkpoint = ""  # source of transfer-pgd/-cw: a .pth or a workdir
  config.eval.transfer_model = ""  # the .pth source's architecture ("" = model.name)
  # Budgets of the attacks whose names carry no step count (defaults: their papers').
  config.eval.apgd_steps = 100
  config.eval.fab_steps = 100
  config.eval.square_queries = 5000
  config.eval.target_classes = 9
  config.eval.n_attack_population = 300
  config.eval.n_attack_iters = 500
  config.eval.md_restarts = 1
  config.eval.eot_draws = 10  # per step of eot / avg-pgd
  config.eval.aa_rand_draws = 20  # per step of aa-rand (AutoAttack's rand version)
  config.eval.verdict_draws = 10  # fresh draws whose majority judges a randomized model

  # Channel analyses (--mode=analyze, cas_jax/analysis/channels.py): the paper's Figs. 1, 2/10 and 9 on
  # natural and PGD test examples (the attack of config.eval: adaptive PGD-20, eps 8/255).
  config.analysis = ml_collections.ConfigDict()
  config.analysis.num_images = 1000  # first test images; 0 = the whole test set
  config.analysis.class_index = 0  # the class of the activation-frequency figure (Fig. 2)
  config.analysis.thresholds = (0.005, 0.01, 0.05)  # fractions of an example's largest channel
  config.analysis.compare = ""  # another workdir (or .pth) drawn beside this model
  config.analysis.compare_cas_stages = ""  # its model.cas_stages ("" = model.cas_stages)
  config.analysis.tsne_images = 500  # t-SNE (Fig. 9) on the first of the images; 0 = all
  config.analysis.tsne_perplexity = 30.0
  config.analysis.tsne_max_iter = 1000

  config.ckpt = ml_collections.ConfigDict()
  config.ckpt.every_epochs = 1
  config.ckpt.every_steps = 0  # also every N steps (0 = off); SIGTERM / SIGINT always save
  config.ckpt.async_save = True

  config.log_every_steps = 50
  # Resume a workdir whose recorded config.json differs in a field that changes the trained
  # model (recorded in provenance.json); raising schedule.num_epochs needs no flag.
  config.allow_config_change = False
  # JAX's persistent compilation cache for the CLI commands (cas_jax/compilation.py): a
  # folder, or "off". The environment variable CAS_JAX_COMPILATION_CACHE takes precedence.
  config.compilation_cache = "~/.cache/cas_jax/jax"
  return config


def under_l2(config: ml_collections.ConfigDict, eps: float = 0.5) -> ml_collections.ConfigDict:
  """config trained and evaluated under L2: PGD-L2 adversaries of eps (RobustBench's 0.5) with
  step eps / 4, as common L2 adversarial-training recipes (10 steps); reports at L2 eps."""
  config.attack.norm, config.attack.eps, config.attack.step_size = "l2", eps, eps / 4
  config.eval.norm, config.eval.eps = "l2", eps
  return config


def setting(objective: str, cas: bool, model: str = "resnet18",
            dataset: str = "cifar10") -> ml_collections.ConfigDict:
  """A paper setting: objective x (+-CAS) x architecture x dataset (paper section 5.1)."""
  if dataset not in ("cifar10", "cifar100", "svhn_cropped"):
    raise ValueError(f"unknown dataset {dataset!r}; valid: cifar10, cifar100, svhn_cropped")
  config = get_config()
  config.data.dataset = dataset
  config.data.num_classes = 100 if dataset == "cifar100" else 10
  config.loss.objective = objective
  config.model.name = model
  config.model.cas_stages = "default" if cas else "none"
  if objective in ("trades", "mart"):
    # TRADES / MART adversaries: x + 0.001 N(0, 1), 10 steps of 0.007, eps 0.031.
    config.attack.start = "normal"
    config.attack.eps = 0.031
    config.attack.step_size = 0.007
    config.schedule.milestones = (75, 90, 100)
    # lambda: 6 in the TRADES and MART papers; the released scripts use 4 (TRADES+CAS), 5 (MART).
    config.loss.lam = 6.0
  if model.startswith("wrn"):
    config.optim.weight_decay = 5e-4
  if model == "vgg16":
    config.loss.beta = 3.0
  if dataset == "svhn_cropped":
    # The authors released no SVHN script; flips turn digits into other glyphs, so SVHN
    # adversarial-training code usually trains on the images as they are.
    config.data.augment = False
    config.optim.lr = 0.01
    config.optim.weight_decay = 5e-4
    config.attack.step_size = 1 / 255
  return config
