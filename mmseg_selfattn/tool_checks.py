"""The checks the tools (``tools/*.py``) run before their first image: read the user's
config with their ``--cfg-options``, check that it is a segmentor config with a test set
whose folders exist, check the launcher's environment, build the runner or the model,
and turn a mistake found on the way into one ``cli.UsageError`` naming the option or file
that caused it (one line on stderr, exit status 2; docs/errors.md). Errors that are not
the user's (bugs of ours) are let through with their traceback.

The argparse-level checks (``key_value``, ``torch_device``, ``check_pretrained``, ...) are
in ``cli``, which stays light; this module needs mmengine.
"""
import argparse
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from mmengine.config import Config
from mmengine.runner import Runner

from .benchmarks import dataset_cfg_of
from .cli import USER_FILE_ERRORS, UsageError, check_exists, user_files
from .hooks import check_class_count, check_not_empty


# -- the config ------------------------------------------------------------------------------
def read_config(path, cfg_options: Optional[dict] = None, option: str = 'CONFIG',
                errors: Tuple[type, ...] = USER_FILE_ERRORS) -> Config:
    """``Config.fromfile(path)`` merged with ``--cfg-options``. A file that does not exist,
    an error of ``errors`` while reading it, or an option the config cannot take (a list
    index beyond its end, a key below a number: ``TypeError``) is a ``UsageError`` naming
    ``option`` and the file, or ``--cfg-options``."""
    check_exists(option, str(path))
    with user_files(f'{option} {path}', errors):
        cfg = Config.fromfile(str(path))
    if cfg_options:
        with user_files('--cfg-options', USER_FILE_ERRORS + (TypeError, )):
            cfg.merge_from_dict(cfg_options)
    return cfg


def load_config(path, cfg_options: Optional[dict] = None, option: str = 'CONFIG') -> Config:
    """``read_config`` of a config to evaluate (test.py, sweep.py, eval_all.py,
    check_data.py, ablate.py): any error executing the file is the file's (a config is
    Python), and a config without a test set (``test_dataloader.dataset``) is a
    ``UsageError`` naming it."""
    cfg = read_config(path, cfg_options, option, (Exception, ))
    loader = cfg.get('test_dataloader')
    dataset = loader.get('dataset') if isinstance(loader, dict) else None
    while isinstance(dataset, dict) and 'dataset' in dataset and 'data_root' not in dataset:
        dataset = dataset['dataset']  # as dataset_cfg_of looks through RepeatDataset
    if not isinstance(dataset, dict):
        raise UsageError(f'{option} {path}: no test set: the config needs '
                         'test_dataloader = dict(dataset=dict(type=..., data_root=...), ...)')
    return cfg


def check_segmentor_config(cfg: Config, what: str, example: str = '') -> None:
    """``UsageError`` naming ``what`` (the config, as the user gave it) unless ``cfg`` has
    a ``model.clip`` dict (a segmentor of this package); ``example``: a config to suggest."""
    model = cfg.get('model')
    if not isinstance(model, dict) or not isinstance(model.get('clip'), dict):
        raise UsageError(f'{what}: not a segmentor config of this package (it has no '
                         'model.clip)' + (f'; give e.g. {example}' if example else ''))


def with_cfg_options(what: str, cfg_options: Optional[dict]) -> str:
    """``what`` (the config, as the user gave it) + ' with --cfg-options' when options
    were given: the source of a setting the model refuses."""
    return what + (' with --cfg-options' if cfg_options else '')


# -- the model's settings --------------------------------------------------------------------
def setting_source(args: argparse.Namespace, message: str, keyword: str = '',
                   config_option: str = '--config',
                   clip_options: Sequence[str] = ('arch', 'pretrained')) -> str:
    """The option that set the model setting ``message`` names (or the one whose last key
    is ``keyword``), else the config.

    Args:
        args: the tool's arguments: ``config``, ``cfg_options`` and each of ``clip_options``.
        config_option: how the tool names its config (``'--config'``, ``'CONFIG'``).
        clip_options: the tool's options (``--<name>``) that set ``model.clip.<name>``
            (those that are None were not given).
    """
    options = [(f'--{name} {getattr(args, name)}', f'clip.{name}') for name in clip_options
               if getattr(args, name) is not None]
    options += [(f'--cfg-options {key}={value}', key.removeprefix('model.'))
                for key, value in (args.cfg_options or {}).items()]
    return next((option for option, key in options
                 if (key.split('.')[-1] == keyword if keyword else key in message)),
                f'{config_option} {args.config}')


def config_keys(cfg) -> set:
    """Every key of a (nested) config dict."""
    keys = set()
    for key, value in cfg.items():
        keys.add(key)
        if isinstance(value, dict):
            keys |= config_keys(value)
    return keys


@contextmanager
def model_settings(args: argparse.Namespace, cfg: Config, config_option: str = '--config',
                   clip_options: Sequence[str] = ('arch', 'pretrained')) -> Iterator[None]:
    """Errors of building the model that come from its settings (the package raises
    ``ValueError`` naming the key; an unknown key is a ``TypeError`` of the constructor)
    -> ``UsageError`` naming the option or file that set it (``setting_source``, whose
    arguments these are)."""
    try:
        yield
    except TypeError as error:
        keyword = re.search(r"unexpected keyword argument '(\w+)'", str(error))
        if keyword is None or keyword.group(1) not in config_keys(cfg.model):
            raise  # not a key of the user's: a bug
        source = setting_source(args, str(error), keyword.group(1), config_option,
                                clip_options)
        raise UsageError(f'{source}: {error}') from error
    except USER_FILE_ERRORS as error:
        with user_files(setting_source(args, str(error), '', config_option, clip_options)):
            raise


# -- the run ---------------------------------------------------------------------------------
LAUNCHERS = {'pytorch': ('torchrun', ('RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')),
             'slurm': ('srun', ('SLURM_PROCID', 'SLURM_NTASKS', 'SLURM_NODELIST')),
             'mpi': ('mpirun', ('OMPI_COMM_WORLD_LOCAL_RANK', 'OMPI_COMM_WORLD_RANK',
                                'OMPI_COMM_WORLD_SIZE'))}


def check_launcher(launcher: str) -> None:
    """``--launcher X`` needs the environment its process starter sets."""
    starter, names = LAUNCHERS.get(launcher, ('', ()))
    missing = [name for name in names if name not in os.environ]
    if missing:
        raise UsageError(f'--launcher {launcher}: {", ".join(missing)} not set; start the '
                         f'tool with {starter} (one process per GPU), or leave out --launcher')


def missing_paths(dataset: dict) -> List[str]:
    """The folders and split file of ``dataset`` that do not exist."""
    root = Path(dataset.get('data_root') or '')
    prefixes = dataset.get('data_prefix') or {}
    wanted = [('data_root', root)]
    wanted += [(f'data_prefix.{key}', root / value) for key, value in prefixes.items()]
    if dataset.get('ann_file'):
        wanted.append(('ann_file', root / dataset['ann_file']))
    return [f'{key}: {path} does not exist' for key, path in wanted if not path.exists()]


def check_data_folders(cfg: Config, what: str, hint: str = '') -> None:
    """``UsageError`` naming ``what`` (the config) and the first missing folder or split
    file of the test set, before anything is built."""
    problems = missing_paths(dataset_cfg_of(cfg))
    if problems:
        more = f' (and {len(problems) - 1} more)' if len(problems) > 1 else ''
        first = problems[0].replace(': ', ' ', 1)  # 'data_root /x does not exist'
        raise UsageError(f'{what}: test data not found: {first}{more}; '
                         f'{hint or "set test_dataloader.dataset.data_root"}')


@contextmanager
def build_errors(what: str) -> Iterator[None]:
    """``user_files(what)`` for building a model, dataset or runner from a config: also an
    unknown or missing config key (the ``TypeError`` of the constructor's call)."""
    try:
        with user_files(what):
            yield
    except TypeError as error:
        message = str(error)
        if 'unexpected keyword argument' not in message and \
                'required positional argument' not in message:
            raise  # a bug of ours
        raise UsageError(f'{what}: {" ".join(message.split())}') from error


def checked_runner(cfg: Config, what: str, hint: str = '') -> Runner:
    """The Runner of ``cfg`` with its model and test loop built and the test set checked
    (folders and split file exist, the split lists images, the model has one class per
    dataset class), before the first image. A mistake in the config or the user's files
    (a value the model refuses, unknown keys, a dataset type that does not exist, missing
    weights) is a ``UsageError`` naming ``what``; errors of the test loop itself are not
    caught. mmseg's warning that its visualization hook does not draw (off in our
    configs: ``--show`` turns it on) is not shown."""
    check_data_folders(cfg, what, hint)
    with build_errors(what):
        with warnings.catch_warnings():
            warnings.filterwarnings('ignore', 'The draw is False')  # SegVisualizationHook
            runner = Runner.from_cfg(cfg)
        dataset = runner.test_loop.dataloader.dataset  # builds the loop and dataset
        check_not_empty(dataset)  # what TestSetCheckHook checks again in before_test
        class_names = getattr(getattr(runner.model, 'module', runner.model),
                              'class_names', None)
        if class_names is not None:
            check_class_count(class_names, dataset)
    return runner
