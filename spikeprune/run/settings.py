"""RunSettings: every setting of a pruning run, each checked when the object is built (before the
run touches anything), and the part of them that is hashed into the run's fingerprint."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import SpikepruneError
from ..importance import get as get_importance
from ..policy_api import Constraints, get_policy, policies
from ..ratios import DEFAULT_SENSITIVITY_RATIOS, UNIFORM_GRID, parse_ratios
from ..validation import FinetuneSettings, max_images_per_split, number, whole
from ..validation import device as check_device
from .folder import RUN_VERSION, jsonable

MEASURE_IMAGES = 256  # test images whose firing rates give SOPs and energy
LATENCY_REPEATS = 10  # modest: a demo must stay quick; the benchmark measures latency properly
SPLITS = ("train", "calib", "test")
_UNHASHED = ("output", "force", "progress", "model_spec", "device", "workers", "shared_steps", "threads")


def _registered_importance(importance) -> str:
    """The name of a registered importance criterion (given by name or as the object); unknown
    names list the known ones, an object that is not registered is refused."""
    crit = get_importance(importance)  # a registered name or object; unknown: the names are listed
    try:
        registered = get_importance(crit.name) is crit
    except SpikepruneError:
        registered = False
    if not registered:
        raise SpikepruneError(f"importance {crit!r} is not registered; register it with "
                              "spikeprune.importance.register_importance so that the run can record it by name")
    return crit.name


@dataclass
class RunSettings:
    """Every setting of a pruning run; each field is checked when the object is built.

    Fields mirror `spikeprune prune`'s options (the module docstring says what a run does):
    constraints (a Constraints), the sensitivity grid `ratios`, the uniform sweep grid
    `uniform_ratios`, `groups` (pattern of the groups the sensitivity analysis covers), `options`
    (the policy's own options, e.g. {"uniform": 0.3} or {"ratio": ["residual=0.25"]}), `max_images`
    (image caps per split, e.g. {"calib": 200, "test": 300}: they reach the policy, the sensitivity
    analysis, fine-tuning and measuring alike), `model_spec` (a label for the report),
    `shared_steps` (a run folder of the same model, data and measuring settings whose shareable
    finished steps -- SHAREABLE_STEPS, and the sensitivity table when the policy reads one -- a new
    run copies instead of recomputing: the benchmark computes them once for every policy),
    `threads` (torch's CPU threads for the whole run; None: as set). output, force, progress,
    model_spec, device, workers and shared_steps do not change the result and are not part of the
    fingerprint; threads changes fine-tuned weights, so it enters it through `finetuning` (the
    fine-tuning settings as one FinetuneSettings, None without fine-tuning).
    """
    data: str
    output: str | Path
    policy: str = "primesvt"
    constraints: Constraints = field(default_factory=Constraints)
    importance: str = "l2"
    round_to: int = 1
    ratios: tuple = DEFAULT_SENSITIVITY_RATIOS
    uniform_ratios: tuple = UNIFORM_GRID
    groups: str = "*"
    batch_size: int = 128
    workers: int = 0
    device: str = "cpu"
    seed: int = 0
    calib_batches: int = 4
    finetune_epochs: int = 0
    kd: bool = False
    kd_weight: float = 0.5
    kd_temperature: float = 4.0
    finetune_lr: float = 1e-4
    finetune_batch_size: int = 64
    options: dict = field(default_factory=dict)
    max_images: dict | None = None
    measure_images: int = MEASURE_IMAGES
    latency_repeats: int = LATENCY_REPEATS
    model_spec: str | None = None
    force: bool = False
    progress: bool = True
    shared_steps: str | Path | None = None
    limit_after_finetune: bool = False
    threads: int | None = None

    def __post_init__(self):
        # In the order of the fields, so that of two bad values the same one is named as before.
        self._check_what_and_where()
        self._check_search()
        self._check_finetuning()
        self._check_caps_and_sharing()

    def _check_what_and_where(self) -> None:
        """The data, the run folder, the policy, the constraints and the importance criterion."""
        if not isinstance(self.data, str) or not self.data.strip():
            raise SpikepruneError(f"data must be a dataset spec NAME[:PATH] (e.g. mnist5k), got {self.data!r}")
        if self.output is None or not str(self.output).strip():
            raise SpikepruneError("an output run folder is needed (-o RUN)")
        self.output = Path(self.output)
        get_policy(self.policy)
        if isinstance(self.constraints, dict):
            self.constraints = Constraints(**self.constraints)
        if not isinstance(self.constraints, Constraints):
            raise SpikepruneError(f"constraints must be a spikeprune Constraints, got {type(self.constraints).__name__}")
        self.importance = _registered_importance(self.importance)  # a name: what run.json and the fingerprint record

    def _check_search(self) -> None:
        """What the policy and the sensitivity analysis search over and how they evaluate."""
        self.round_to = whole("--round-to", self.round_to, 1)
        self.ratios = parse_ratios(self.ratios, "--ratios")
        self.uniform_ratios = parse_ratios(self.uniform_ratios, "--uniform-ratios")
        if not isinstance(self.groups, str) or not [p for p in self.groups.split(",") if p.strip()]:
            raise SpikepruneError(f"--groups must be glob pattern(s), e.g. '*' or 'block*.mlp.hidden', got {self.groups!r}")
        self.batch_size = whole("--batch-size", self.batch_size, 1)
        self.workers = whole("--workers", self.workers, 0)
        self.device = check_device(self.device)
        self.seed = whole("--seed", self.seed, 0)
        self.calib_batches = whole("--calib-batches", self.calib_batches, 1)
        if isinstance(self.finetune_epochs, bool) or not isinstance(self.finetune_epochs, int) or self.finetune_epochs < 0:
            raise SpikepruneError(f"--finetune-epochs must be 0 or more, got {self.finetune_epochs!r}")
        if self.threads is not None:
            self.threads = whole("--threads", self.threads, 1)

    def _check_finetuning(self) -> None:
        """Distillation and --limit-after-finetune need fine-tuning; the fine-tuning numbers."""
        if self.kd and self.finetune_epochs == 0:
            raise SpikepruneError("--kd distils during fine-tuning: give --finetune-epochs N (N >= 1) as well")
        self.kd = bool(self.kd)
        self.limit_after_finetune = bool(self.limit_after_finetune)
        if self.limit_after_finetune:
            if self.finetune_epochs == 0:
                raise SpikepruneError("--limit-after-finetune holds the accuracy limit on the fine-tuned model: give "
                                      "--finetune-epochs N (N >= 1) as well")
            if not get_policy(self.policy).after_finetune:
                able = sorted(n for n, p in policies().items() if p.after_finetune)
                raise SpikepruneError(f"--limit-after-finetune: the {self.policy} policy chooses its model by the "
                                      f"accuracy before fine-tuning; use --policy {' or '.join(able) or '(none)'}")
        # Checked whether or not fine-tuning is asked for (a bad value is a mistake either way).
        self.kd_weight = number("--kd-weight", self.kd_weight, 0, 1)
        self.kd_temperature = number("--kd-temperature", self.kd_temperature, 0, low_open=True)
        self.finetune_lr = number("--finetune-lr", self.finetune_lr, 0, low_open=True)
        self.finetune_batch_size = whole("--finetune-batch-size", self.finetune_batch_size, 1)

    def _check_caps_and_sharing(self) -> None:
        """The policy's options, the image caps, measuring, and the run whose steps are shared."""
        if not isinstance(self.options, dict):
            raise SpikepruneError(f"options must be a dict of the policy's own options, got {type(self.options).__name__}")
        self.options = {k: v for k, v in self.options.items() if v is not None and v != []}
        self.max_images = max_images_per_split(self.max_images, SPLITS)
        self.measure_images = whole("measure_images", self.measure_images, 1)
        self.latency_repeats = whole("--latency-repeats", self.latency_repeats, 1)
        self.force, self.progress = bool(self.force), bool(self.progress)
        if self.shared_steps is not None:
            self.shared_steps = Path(self.shared_steps)
            if not (self.shared_steps / "run.json").is_file():
                raise SpikepruneError(f"shared_steps {self.shared_steps} is not a run folder (no run.json)")

    @property
    def finetuning(self) -> FinetuneSettings | None:
        """The run's fine-tuning as one object (what the fine-tuning step and the policies read), or
        None without fine-tuning."""
        if not self.finetune_epochs:
            return None
        return FinetuneSettings(epochs=self.finetune_epochs, lr=self.finetune_lr, batch_size=self.finetune_batch_size,
                                kd=self.kd, kd_weight=self.kd_weight, kd_temperature=self.kd_temperature,
                                threads=self.threads)

    @property
    def finetune(self) -> dict | None:
        """The fine-tuning settings as summary.json lists them, or None without fine-tuning."""
        f = self.finetuning
        return None if f is None else f.to_dict()

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d.update(output=str(self.output), constraints=self.constraints.user_dict(), ratios=list(self.ratios),
                 uniform_ratios=list(self.uniform_ratios), options=jsonable(self.options),
                 shared_steps=None if self.shared_steps is None else str(self.shared_steps))
        return d

    def fingerprint_fields(self) -> dict:
        """The settings that change the result (what run.json's fingerprint hashes, with the model)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _UNHASHED}
        for k in ("kd", "kd_weight", "kd_temperature", "finetune_lr", "finetune_batch_size", "finetune_epochs"):
            d.pop(k)
        d["finetune"] = self.finetune
        if not d["limit_after_finetune"]:
            d.pop("limit_after_finetune")  # runs made before the setting existed keep their fingerprint
        d["run_version"] = RUN_VERSION
        return d
