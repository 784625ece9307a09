"""The validation callback: renders, benchmark, eval loss and CLIP scores at their times.

Only the main process renders, evaluates, writes files and logs; the other
processes wait at a barrier meanwhile. What runs when:

- start of training: eval datasets are cached, the CLIP model loaded and the
  base-model benchmark rendered (or read back); with validation_on_startup a
  first validation round follows.
- after optimizer steps and at epoch ends: validation and evaluation rounds
  per ``schedule.Schedule``.
- end of training: a last validation round unless the last step just had one.

validation_disable (or no prompt at all) stops rendering only: eval loss on
eval datasets still runs on its schedule.

Saved images are ``output_dir/validation_images/step<N>_<prompt>_<W>x<H>_<i>.png``:
the benchmark render (when there is one), then the trained weights' render,
then the EMA weights' render (ema_validation=comparison), side by side; with
validation adapters, that row repeats per adapter run (``adapter_specs``).
With validation_using_datasets, dataset images join the prompts and render
image-to-image, their input shown at validation_stitch_input_location. A
ControlNet run renders with its control image (``control``), shown there too.
"""

from __future__ import annotations

import logging
import math
import os

from PIL import Image
from tqdm.auto import tqdm

from simpletuner.config.errors import ConfigError
from simpletuner.training.callbacks import Callback
from simpletuner.validation import benchmark as benchmarks
from simpletuner.validation.adapter_loading import adapter_option, check_runs, run_attached
from simpletuner.validation.adapter_specs import AdapterRun, adapter_runs
from simpletuner.validation.checks import EXTERNAL_METHOD, validation_errors
from simpletuner.validation.clip_score import ClipScorer, summarize
from simpletuner.validation.compiled import ValidationCompiler
from simpletuner.validation.control import ControlImage, controlled_denoiser, first_control_image
from simpletuner.validation.dataset_inputs import dataset_prompts, input_dataset_ids
from simpletuner.validation.eval_loss import EvalLoss, eval_specs, open_eval_sets, tracker_values
from simpletuner.validation.images import (IMAGES_FOLDER, RenderKey, fixed_seed, image_name, render_keys, round_seed,
                                           save_png, stitch, with_input)
from simpletuner.validation.prompts import ValidationPrompt, load_prompts
from simpletuner.integrations.webhooks import send_event
from simpletuner.validation.renderer import Renderer
from simpletuner.validation.resolutions import parse_resolutions
from simpletuner.validation.schedule import Schedule
from simpletuner.validation.tracking import log_images, log_scalars
from simpletuner.validation.weights import base_weights, validation_mode, weight_variants

logger = logging.getLogger("simpletuner.validation")


class ValidationCallback(Callback):
    def __init__(self, settings, prompts: list[ValidationPrompt]):
        self.settings = settings
        self.prompts = prompts
        self.by_name = {prompt.shortname: prompt for prompt in prompts}
        self.uses_datasets = bool(settings.validation_using_datasets) and not settings.validation_disable
        self.renders = (bool(prompts) or self.uses_datasets) and not settings.validation_disable
        self.sizes = parse_resolutions(settings.validation_resolution) if self.renders else []
        self.count = max(1, int(settings.num_validation_images or 1))
        self.schedule = Schedule(settings)
        self.runs: list[AdapterRun] = adapter_runs(settings) if self.renders else []
        self.compiler = ValidationCompiler(settings)
        self.benchmark: benchmarks.Benchmark | None = None
        self.eval_loss: EvalLoss | None = None
        self.clip: ClipScorer | None = None
        self.evaluates = False  # decided identically on every process, so all reach the same barriers
        self.last_validated: int | None = None
        self.last_evaluated: int | None = None
        self._rendered: dict[tuple[str, RenderKey], Image.Image] = {}  # this step's renders, for CLIP to reuse
        self._step_seed: int | None = None
        self._control_image: ControlImage | None = None

    # --- hooks -------------------------------------------------------------------------------
    def on_train_start(self, trainer) -> None:
        wants_eval_sets = not self.settings.eval_loss_disable and bool(eval_specs(trainer.data))
        wants_clip = self.settings.evaluation_type == "clip"
        wants_inputs = self.renders and self.uses_datasets
        if wants_inputs:
            input_dataset_ids(self.settings, trainer.data.specs)  # every process stops on a bad eval_dataset_id
        wants_adapters = self.renders and any(not run.is_base for run in self.runs)
        wants_benchmark = self.renders and not self.settings.disable_benchmark
        wants_startup = self.renders and bool(self.settings.validation_on_startup)
        self.evaluates = wants_eval_sets or wants_clip
        if not (wants_eval_sets or wants_clip or wants_inputs or wants_adapters or wants_benchmark or wants_startup):
            return
        _enter_phase(trainer, "validation setup (inputs, adapters, eval caches, CLIP model, benchmark)")
        trainer.accelerator.wait_for_everyone()
        if trainer.accelerator.is_main_process:
            with validation_mode(trainer):
                if wants_inputs:
                    self._add_dataset_prompts(trainer)
                if wants_adapters:
                    check_runs(trainer.family, self._adapter_target(trainer), self.runs, adapter_option(self.settings))
                if wants_eval_sets:
                    self.eval_loss = EvalLoss(open_eval_sets(trainer), trainer.family, trainer.loss_step,
                                              self.settings)
                if wants_clip:
                    self.clip = ClipScorer(self.settings.pretrained_evaluation_model_name_or_path, trainer.device)
                if wants_benchmark:
                    self._prepare_benchmark(trainer)
                if wants_startup:
                    self._validate(trainer, trainer.state.global_step)
            self._rendered.clear()
        if wants_startup:
            self.last_validated = trainer.state.global_step
        trainer.accelerator.wait_for_everyone()

    def on_step_end(self, trainer, step: int, loss: float) -> None:
        validation_due = self.schedule.validation_at_step(step)
        if self.schedule.eval_follows_validation:
            eval_due = validation_due
        else:
            eval_due = self.schedule.eval_at_step(step, self._optimizer_steps_per_epoch(trainer))
        self._run(trainer, step, self.renders and validation_due, eval_due and self.evaluates)

    def on_epoch_end(self, trainer, epoch: int) -> None:
        due = self.schedule.validation_at_epoch_end(epoch)
        eval_due = due and self.schedule.eval_follows_validation and self.evaluates
        self._run(trainer, trainer.state.global_step, self.renders and due, eval_due)

    def on_train_end(self, trainer, output_dir: str) -> None:
        """Main process only (the trainer calls it there): a last round for the final weights."""
        step = trainer.state.global_step
        if self.renders and self.last_validated != step:
            with validation_mode(trainer, resume_training=False):
                self._validate(trainer, step)
            self._rendered.clear()
            self.last_validated = step

    # --- rounds ------------------------------------------------------------------------------
    def _run(self, trainer, step: int, validate: bool, evaluate: bool) -> None:
        validate = validate and self.last_validated != step
        evaluate = evaluate and self.last_evaluated != step
        if not (validate or evaluate):
            return
        accelerator = trainer.accelerator
        _enter_phase(trainer, f"validation at step {step}")
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            with validation_mode(trainer):
                if validate:
                    self._validate(trainer, step)
                if evaluate:
                    self._evaluate(trainer, step)
            self._rendered.clear()
        self.last_validated = step if validate else self.last_validated
        self.last_evaluated = step if evaluate else self.last_evaluated
        accelerator.wait_for_everyone()

    def _optimizer_steps_per_epoch(self, trainer) -> int:
        accumulation = int(self.settings.gradient_accumulation_steps or 1)
        return math.ceil(trainer.data.steps_per_epoch / accumulation)

    def _add_dataset_prompts(self, trainer) -> None:
        """validation_using_datasets: dataset images with their captions join the prompts (img2img renders)."""
        added = dataset_prompts(trainer, taken=set(self.by_name))
        self.prompts = [*self.prompts, *added]
        self.by_name.update({prompt.shortname: prompt for prompt in added})
        logger.info("Validation renders image-to-image from %d dataset images: %s", len(added),
                    ", ".join(prompt.shortname for prompt in added))

    @staticmethod
    def _live_denoiser(trainer):
        return trainer.accelerator.unwrap_model(trainer.model)

    def _adapter_target(self, trainer):
        """What validation adapters attach to: the denoiser (in a ControlNet run, the frozen one beside it)."""
        live = self._live_denoiser(trainer)
        controlled = controlled_denoiser(live)
        return controlled.denoiser if controlled is not None else live

    def _control(self, trainer) -> ControlImage | None:
        """A ControlNet or channel-control run's validation control image (loaded once), or None."""
        if (self.settings.controlnet or self.settings.control) and self._control_image is None:
            self._control_image = first_control_image(trainer.data.conditioning, trainer.data.indexes())
            logger.info("Validation renders use the control image %s", self._control_image.source)
        return self._control_image

    def _renderer(self, trainer, seed: int) -> Renderer:
        denoiser = self.compiler.denoiser_for(self._live_denoiser(trainer))
        return Renderer(trainer.family, denoiser, self.settings, trainer.device, seed, trainer.accelerator.autocast,
                        control_image=self._control(trainer))

    def _validate(self, trainer, step: int) -> None:
        seed = round_seed(self.settings)
        keys = render_keys(self.prompts, self.sizes, self.count)
        panels: dict[RenderKey, list[Image.Image]] = {key: [] for key in keys}
        if self.benchmark is not None:
            for key in keys:
                base = self.benchmark.beside(key)
                panels[key].extend([base] if base is not None else [])
        variants = weight_variants(trainer)
        renderer = self._renderer(trainer, seed)
        option = adapter_option(self.settings)
        with tqdm(total=len(keys) * len(variants) * len(self.runs), desc=f"Validation (step {step})",
                  unit="image", leave=False) as bar:
            for run in self.runs:
                with run_attached(trainer.family, self._adapter_target(trainer), run, option):
                    for label, swapped in variants:
                        with swapped():
                            self._render_keys(renderer, keys, _run_label(label, run), panels, bar)
        self._save_and_log(trainer, step, panels)
        self._step_seed = seed

    def _render_keys(self, renderer: Renderer, keys: list[RenderKey], label: str,
                     panels: dict[RenderKey, list[Image.Image]], bar) -> None:
        for key in keys:
            image = renderer.render(self.by_name[key.shortname], key)
            self._rendered[(label, key)] = image
            panels[key].append(image)
            bar.update(1)

    def _save_and_log(self, trainer, step: int, panels: dict[RenderKey, list[Image.Image]]) -> None:
        folder = os.path.join(self.settings.output_dir, IMAGES_FOLDER)
        location = self.settings.validation_stitch_input_location or "left"
        by_tag: dict[str, list[Image.Image]] = {}
        saved = []
        for key, images in panels.items():
            prompt = self.by_name[key.shortname]
            prompt_slug = prompt.slug
            shown = prompt.input_image
            if shown is None and self._control_image is not None:
                shown = self._control_image.at(key.width, key.height)
            combined = stitch(with_input(images, shown, location))
            saved.append(os.path.join(folder, image_name(step, prompt_slug, key)))
            save_png(combined, folder, image_name(step, prompt_slug, key))
            by_tag.setdefault(f"validation/{prompt_slug}_{key.size_label}", []).append(combined)
        log_images(trainer.accelerator, by_tag, step, self.settings.tracker_image_layout or "gallery")
        logger.info("Saved %d validation images for step %d in %s", len(panels), step, folder)
        send_event("validation", {"global_step": step, "images": saved},
                   message=f"Validation images for step {step} saved to {folder}")

    def _evaluate(self, trainer, step: int) -> None:
        label, swapped = weight_variants(trainer)[0]
        values: dict[str, float] = {}
        with swapped():
            if self.eval_loss is not None and self.eval_loss.active:
                with trainer.accelerator.autocast():
                    results = self.eval_loss.evaluate(trainer.device)
                values.update(tracker_values(results, bool(self.settings.eval_dataset_pooling)))
            if self.clip is not None:
                images, texts = self._clip_inputs(trainer, step, label)
                values.update(summarize(self.clip.score(images, texts)))
        log_scalars(trainer.accelerator, values, step)
        logger.info("Evaluation at step %d: %s", step, ", ".join(f"{k}={v:.5f}" for k, v in values.items()))

    def _clip_inputs(self, trainer, step: int, label: str) -> tuple[list[Image.Image], list[str]]:
        """num_eval_images renders per prompt at the first validation size; this step's renders are reused."""
        scored = [prompt for prompt in self.prompts if not prompt.is_unconditional]
        keys = render_keys(scored, self.sizes[:1], max(1, int(self.settings.num_eval_images or 1)))
        seed = self._step_seed if self._rendered else round_seed(self.settings)
        renderer = None
        images = []
        for key in keys:
            image = self._rendered.get((label, key))
            if image is None:
                renderer = renderer or self._renderer(trainer, seed)
                image = renderer.render(self.by_name[key.shortname], key)
            images.append(image)
        return images, [self.by_name[key.shortname].text for key in keys]

    # --- benchmark ---------------------------------------------------------------------------
    def _prepare_benchmark(self, trainer) -> None:
        seed = fixed_seed(self.settings)
        keys = render_keys(self.prompts, self.sizes, self.count)
        control = self._control(trainer)
        fingerprint = benchmarks.fingerprint(self.settings, self.prompts, keys, seed,
                                             control.source if control is not None else None)
        benchmark = benchmarks.Benchmark(self.settings.output_dir, fingerprint)
        if benchmark.load(self.by_name, keys):
            self.benchmark = benchmark
            return
        base = base_weights(trainer)
        if base is None:
            logger.warning("No benchmark images: this resumed full fine-tune no longer has the base model's "
                           "weights and %s holds none for these settings.", benchmark.folder)
            return
        renderer = self._renderer(trainer, seed)
        images = {}
        with base(), tqdm(total=len(keys), desc="Benchmark (base model)", unit="image", leave=False) as bar:
            for key in keys:
                images[key] = renderer.render(self.by_name[key.shortname], key)
                bar.update(1)
        benchmark.save(self.by_name, images)
        self.benchmark = benchmark


def _run_label(weights_label: str, run: AdapterRun) -> str:
    """The label of one set of renders: the weights, plus the adapter run when there is one."""
    return weights_label if run.is_base else f"{weights_label}+{run.label}"


def _enter_phase(trainer, phase: str) -> None:
    """Tell the multi-process watchdog (when the trainer runs one) why the other ranks are waiting."""
    watchdog = getattr(trainer, "watchdog", None)
    if watchdog is not None:
        watchdog.enter(phase)


def build_validation_callback(settings) -> ValidationCallback | None:
    """The CALLBACK_FACTORIES entry: stops the run on validation settings it cannot honour."""
    errors = validation_errors(settings)
    if errors:
        if len(errors) == 1:
            raise errors[0]
        raise ConfigError(errors[0].key, "\n".join(str(error) for error in errors))
    if settings.validation_method == EXTERNAL_METHOD:
        from simpletuner.validation.external import ExternalValidation

        return None if settings.validation_disable else ExternalValidation(settings)
    return ValidationCallback(settings, load_prompts(settings))
