"""Grid sweeps over pipeline settings at the cost of one encoding (tools/sweep.py).

Blocks 1..L-1 of the ViT, most of the cost, see the same crops whatever the stage
settings. ``SweepLoop`` (a ``TestLoop``) therefore encodes every batch once and runs,
for every grid point, only what the point changes: the dense last block, stages 2-6,
the classifier, the window merge and post-processing (``with_pipeline`` variants of
the model sharing its CLIP), each into its own evaluator. Each point's predictions
are those of ``predict`` with that setting, so its metrics equal a ``tools/test.py``
run with it.
"""
import copy
import itertools
import os
import os.path as osp
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from mmengine.config import DictAction
from mmengine.logging import MMLogger
from mmseg.registry import LOOPS
from torch.utils.data import DataLoader

from .machine import MachineAwareTestLoop
from .non_finite import raise_if_not_finite
from .segmentor import PIPELINE_KEYS, SelfAttnCLIPSegmentor

# keys a grid may not vary, and why each needs a separate run
REFUSED_KEYS = {
    'slide_crop': 'the sliding window decides which crops the encoder sees',
    'slide_stride': 'the sliding window decides which crops the encoder sees',
    'clip': 'the CLIP architecture and weights are the encoder',
    'precision': "the ViT's dtype changes every block",
    'name_path': "the class list is the dataset's label order and the text queries",
    'class_names': "the class list is the dataset's label order and the text queries",
    'data_preprocessor': "the pixel normalisation is the encoder's input",
    'max_crops_per_forward': 'a speed setting: it does not change predictions',
    'max_merge_elements': 'a speed setting: it does not change predictions',
    'compile': 'a speed setting: it does not change predictions',
    'test_scales': 'the scales resize the image the encoder sees',
    'cuda_graph': 'a speed setting: it does not change predictions',
}


def parse_grid(items: Sequence[str]) -> Dict[str, list]:
    """``['KEY=V1,V2', ...]`` -> {KEY: [V1, V2]}; values parsed as ``--cfg-options``
    parses them (numbers, True/False/None, strings, ``(8,16)`` tuples)."""
    grid = {}
    for item in items:
        key, sep, values = item.partition('=')
        if not sep or not key or not values:
            raise ValueError(f'--grid {item!r}: expected KEY=V1,V2,... '
                             '(e.g. self_attn_enhancement_cfg.enhancement_strength=0.05,0.1)')
        grid[key] = DictAction._parse_iterable(f'[{values}]')  # a list, whatever the values
    return grid


def check_grid(grid: Dict[str, list]) -> Dict[str, list]:
    """Grid keys relative to ``model`` (a ``model.`` prefix is dropped), each a
    ``PIPELINE_KEYS`` entry or ``<stage>_cfg.<key>``, with at least one value.
    Keys that change the encoder's input or weights are refused, saying why."""
    if not isinstance(grid, dict) or not grid:
        raise ValueError('the grid is empty: give at least one KEY=V1,V2,... axis.')
    checked = {}
    for key, values in grid.items():
        path = key[len('model.'):] if key.startswith('model.') else key
        head, _, rest = path.partition('.')
        if head in REFUSED_KEYS:
            raise ValueError(f'grid key {key!r} cannot be swept in one pass: '
                             f'{REFUSED_KEYS[head]}. Run one evaluation (or one sweep) per '
                             'value instead.')
        if head not in PIPELINE_KEYS and rest and not key.startswith('model.'):
            raise ValueError(f'grid key {key!r} is not a model key: data settings (e.g. the '
                             "short side) change the encoder's input and need separate runs.")
        if head not in PIPELINE_KEYS or (rest and (not head.endswith('_cfg') or '.' in rest)):
            raise ValueError(f'grid key {key!r}: a grid varies {", ".join(PIPELINE_KEYS)}, '
                             'or one key of a stage cfg (e.g. ctd_cfg.eps).')
        if not isinstance(values, (list, tuple)) or not values:
            raise ValueError(f'grid key {key!r} needs a non-empty list of values, '
                             f'got {values!r}.')
        checked[path] = list(values)
    return checked


def grid_points(grid: Dict[str, list]) -> List[Dict[str, Any]]:
    """Every combination of the axes' values, the first axis varying slowest."""
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def pipeline_overrides(base: Dict[str, Any], point: Dict[str, Any]) -> Dict[str, Any]:
    """``with_pipeline`` keyword arguments of a grid point: ``<stage>_cfg.<key>`` values go
    into a copy of the base cfg of that stage."""
    overrides = {}
    for path, value in point.items():
        head, _, key = path.partition('.')
        if key:
            cfg = overrides.setdefault(head, dict(base.get(head) or {}))
            cfg[key] = value
        else:
            overrides[head] = value
    return overrides


def format_value(value: Any) -> str:
    """A value as ``--cfg-options`` reads it back."""
    if isinstance(value, (list, tuple)):
        inner = ','.join(format_value(item) for item in value)
        return f'({inner})' if isinstance(value, tuple) else f'[{inner}]'
    return str(value)


def cfg_options(point: Dict[str, Any]) -> str:
    return ' '.join(f'model.{key}={format_value(value)}' for key, value in point.items())


@torch.no_grad()
def predict_variants(variants: Sequence[SelfAttnCLIPSegmentor], inputs: torch.Tensor,
                     data_samples: list) -> Iterator[list]:
    """``variant.predict(inputs, data_samples)`` for every variant in turn (the samples
    are reused: read each before the next), encoding the batch once per distinct
    enhancement of earlier blocks (``self_attn_enhancement_cfg.layers``). Non-finite
    outputs raise as in ``predict``, once every variant has run on the batch."""
    first = variants[0]  # all share the encoder's weights
    capture = any(variant.pipeline.needs_attention for variant in variants)
    mid_layers = sorted({layer for variant in variants for layer in variant.pipeline.mid_layers})
    layer_sums = tuple(dict.fromkeys(layers for variant in variants
                                     for layers in variant.pipeline.layer_sums))
    last_block = any(variant.pipeline.needs_last_block for variant in variants)  # not scclip
    attention_means = tuple(dict.fromkeys(layers for variant in variants  # ResCLIP's A_c
                                          for layers in variant.pipeline.attention_means))
    data_samples, images, metas = first.unpad_batch(inputs, data_samples)
    batches = list(first.engine.image_groups(images, [tuple(meta['ori_shape'][:2])
                                                      for meta in metas]))
    encodings = {}  # one encoding per distinct enhancement of earlier blocks (layers)

    def groups_of(variant):
        pipeline = variant.pipeline  # what changes blocks 0..L-2 (RF-CLIP's filter, kk sum)
        key = (repr(sorted(pipeline.block_edits.items())) + repr(pipeline.distraction_filter)
               + repr(None if pipeline.rfclip is None else pipeline.rfclip.kk_blocks))
        if key not in encodings:
            encodings[key] = [(indices, batch, merge,
                               [variant.pipeline.encode_crops(crops, capture, mid_layers,
                                                              layer_sums, last_block,
                                                              attention_means)
                                for crops in variant.engine.crop_batches(batch, merge)])
                              for indices, batch, merge in batches]
        return encodings[key]

    finite_flags = []  # checked after the last variant: one host sync per batch
    for variant in variants:
        finite = []
        for indices, batch, merge, encoded in groups_of(variant):
            # RF-CLIP's whole-image embedding (global_image='whole'), once per image
            encoded = list(variant.pipeline.attach_image_embeddings(
                encoded, batch, merge.num_windows, whole=bool(variant.engine.slide_crop)))
            variant.store_predictions(data_samples, indices,
                                      variant.engine.segment_group(batch, merge, encoded),
                                      finite)
        finite_flags.append(finite)
        yield data_samples
    for variant, finite in zip(variants, finite_flags):
        raise_if_not_finite(variant.engine, finite, images, metas)


@LOOPS.register_module()
class SweepLoop(MachineAwareTestLoop):
    """Evaluates every grid point in one pass over the test set.

    Args:
        points: the grid points, each {key relative to ``model``: value}.
        state_file: where each rank saves its progress (``<state_file>.rank<r>``) every
            ``save_every`` batches; a rerun with the same ``fingerprint`` resumes there.
        fingerprint: identifies the config, grid and world size of a saved state.
    """

    def __init__(self, runner, dataloader, evaluator, points: List[Dict[str, Any]],
                 state_file: Optional[str] = None, fingerprint: str = '',
                 save_every: int = 20, fp16: bool = False) -> None:
        evaluator_cfg = copy.deepcopy(evaluator)
        super().__init__(runner, dataloader, evaluator, fp16)
        self.points = [dict(point) for point in points]
        self.evaluators = [runner.build_evaluator(copy.deepcopy(evaluator_cfg))
                           for _ in self.points]
        for index, point_evaluator in enumerate(self.evaluators):
            point_evaluator.dataset_meta = self.dataloader.dataset.metainfo
            for metric in point_evaluator.metrics[int(index == 0):]:
                if hasattr(metric, 'check_labels'):  # the first point's metric checks them
                    metric.check_labels = False
        self.state_file = (f'{state_file}.rank{runner.rank}' if state_file else None)
        self.fingerprint, self.save_every = fingerprint, save_every

    def run(self) -> List[Dict[str, float]]:
        model = getattr(self.runner.model, 'module', self.runner.model)
        variants, variant_of = self._variants(model)
        self.runner.call_hook('before_test')
        self.runner.call_hook('before_test_epoch')
        self.runner.model.eval()
        done = self._resume()
        loader = self.dataloader if not done else skip_batches(self.dataloader, done)
        for offset, data_batch in enumerate(loader):
            idx = done + offset
            self.runner.call_hook('before_test_iter', batch_idx=idx, data_batch=data_batch)
            data = model.data_preprocessor(data_batch, False)
            for sample in data['data_samples']:  # on the device once, not once per point
                if 'gt_sem_seg' in sample:
                    sample.gt_sem_seg.data = sample.gt_sem_seg.data.to(data['inputs'].device)
            for index, samples in enumerate(predict_variants(variants, data['inputs'],
                                                             data['data_samples'])):
                for point in variant_of[index]:
                    self.evaluators[point].process(data_samples=samples, data_batch=data_batch)
            self.runner.call_hook('after_test_iter', batch_idx=idx, data_batch=data_batch,
                                  outputs=samples)
            if self.state_file and (idx + 1) % self.save_every == 0:
                self._save(idx + 1)
        if self.state_file:  # a rerun only re-evaluates the accumulators
            self._save(len(self.dataloader))
        metrics = self._evaluate()
        self.runner.call_hook('after_test_epoch', metrics={
            f'point{index}/{name}': value for index, point_metrics in enumerate(metrics)
            for name, value in point_metrics.items()})
        self.runner.call_hook('after_test')
        return metrics

    def _variants(self, model) -> Tuple[list, List[List[int]]]:
        """One ``with_pipeline`` model per distinct setting (points that differ only in a
        disabled stage's cfg share one), and the points of each."""
        if model.engine.test_scales != (1.0, ):
            raise ValueError(f'model.test_scales={model.engine.test_scales}: a sweep encodes each '
                             'image once at its own size; sweep single-scale configs.')
        logger = MMLogger.get_current_instance()
        level, keyed = logger.level, {}
        logger.setLevel('WARNING')  # not one set of start-up lines per point
        try:
            for index, point in enumerate(self.points):
                overrides = pipeline_overrides(model.pipeline_settings, point)
                variant = model.with_pipeline(**overrides)
                key = repr(sorted(_effective(variant.pipeline_settings).items()))
                keyed.setdefault(key, (variant, []))[1].append(index)
        finally:
            logger.setLevel(level)
        return [v for v, _ in keyed.values()], [points for _, points in keyed.values()]

    def _evaluate(self) -> List[Dict[str, float]]:
        size = len(self.dataloader.dataset)
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel('WARNING')  # not one per-class table per point
        try:
            return [point_evaluator.evaluate(size) for point_evaluator in self.evaluators]
        finally:
            logger.setLevel(level)

    # -- resume ----------------------------------------------------------------------------
    def _resume(self) -> int:
        if not self.state_file or not osp.exists(self.state_file):
            return 0
        state = read_state(self.state_file, self.fingerprint, len(self.evaluators))
        if state is None:
            return 0
        for point_evaluator, results in zip(self.evaluators, state['results']):
            point_evaluator.metrics[0].results = results
        MMLogger.get_current_instance().info(
            f'sweep: resuming after batch {state["batches"]} from {self.state_file}')
        return state['batches']

    def _save(self, batches: int) -> None:
        state = dict(fingerprint=self.fingerprint, batches=batches,
                     results=[e.metrics[0].results for e in self.evaluators])
        tmp = self.state_file + '.tmp'
        torch.save(state, tmp)
        os.replace(tmp, self.state_file)  # a kill while saving keeps the previous state


def read_state(path: str, fingerprint: str, points: int) -> Optional[Dict[str, Any]]:
    """The progress saved in ``path`` by a sweep of the same ``fingerprint``, else None:
    silently for another config, grid or world size; with a one-line warning naming the
    file when it cannot be read (truncated, not a saved state, unreadable) or does not
    hold ``points`` points' results. The sweep then starts over."""
    try:
        state = torch.load(path, weights_only=False)
        problem = None
    except Exception as error:  # noqa: BLE001  (any unreadable file: start over)
        state, problem = None, f'{type(error).__name__}: {error}'
    if problem is None:
        if not isinstance(state, dict) or not {'fingerprint', 'batches', 'results'} <= set(state):
            problem = 'not a saved sweep state (fingerprint, batches, results)'
        elif state['fingerprint'] != fingerprint:
            return None  # another sweep's progress
        elif not isinstance(state['batches'], int) or state['batches'] < 0 or \
                not isinstance(state['results'], list) or len(state['results']) != points:
            problem = f'not the results of {points} points'
    if problem is None:
        return state
    problem = ' '.join(problem.split())[:200]
    MMLogger.get_current_instance().warning(
        f'sweep: the saved progress {path} cannot be read ({problem}); starting over')
    return None


def _effective(kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """Pipeline kwargs without the cfgs of disabled stages (they change nothing)."""
    return {key: value for key, value in kwargs.items()
            if not (key.endswith('_cfg') and not kwargs.get(f'apply_{key[:-4]}', True))}


def skip_batches(loader: DataLoader, batches: int) -> DataLoader:
    """The loader without its first ``batches`` batches (not even loaded)."""
    indices = list(loader.sampler)[batches * loader.batch_size:]
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=indices,
                      num_workers=loader.num_workers, collate_fn=loader.collate_fn,
                      pin_memory=loader.pin_memory, worker_init_fn=loader.worker_init_fn,
                      persistent_workers=loader.persistent_workers and loader.num_workers > 0)
