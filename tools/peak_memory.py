"""Peak memory of one ``predict`` on a huge image (no resize), random CLIP weights.

    python tools/peak_memory.py --size 4320 7680 --device cuda --precision fp16 fp32
    python tools/peak_memory.py --size 3000 4000 --device cpu

GPU: ``torch.cuda.max_memory_allocated`` during the call (the model and the input are
allocated before it and counted). CPU: the process's peak RSS, and its peak before the
call (model, input, imports).
Also printed: the returned class probabilities (C x H x W float32), which any method
must hold, and the time of the call.

A mistake in the arguments (a missing config, a size below 1, an unusable ``--json`` path,
a setting the model refuses) stops it with one line on stderr naming the argument or file,
exit code 2 (docs/errors.md).
"""
import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import mmseg_selfattn  # noqa: E402,F401

import torch  # noqa: E402
from mmengine.config import Config, DictAction  # noqa: E402
from mmengine.registry import init_default_scope  # noqa: E402
from mmseg.registry import MODELS  # noqa: E402
from mmseg.structures import SegDataSample  # noqa: E402

from mmseg_selfattn.cli import (UsageError, check_exists, check_out_file,  # noqa: E402
                                key_value, positive_int, run_main, torch_device,
                                user_files)
from mmseg_selfattn.tool_checks import read_config, with_cfg_options  # noqa: E402

DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / \
    'configs/selfattn/selfattn-full_vit-b16_voc21.py'
GIB = 2**30


def measure(cfg: Config, size, device: str, precision: str, source: str = 'the config'
            ) -> dict:
    init_default_scope('mmseg')
    model_cfg = cfg.model.copy()
    model_cfg.update(precision=precision)
    model_cfg.clip = dict(model_cfg.clip, pretrained=None)
    with user_files(source):  # a setting the model refuses
        model = MODELS.build(model_cfg)
    model = model.to(device).eval()
    image = torch.randn(1, 3, *size, device=device)
    sample = SegDataSample(metainfo=dict(img_shape=tuple(size), ori_shape=tuple(size)))
    rss_before = _peak_rss_gib()
    if device.startswith('cuda'):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = model.predict(image, [sample])[0]
    if device.startswith('cuda'):
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    probs = result.seg_logits.data
    report = dict(size=list(size), device=device, precision=precision, seconds=round(seconds, 2),
                  classes=probs.shape[0], probs_gib=round(probs.numel() * 4 / GIB, 2))
    if device.startswith('cuda'):
        report['peak_gib'] = round(torch.cuda.max_memory_allocated() / GIB, 2)
    else:  # the model and the input are in the RSS before the call
        report.update(rss_before_gib=round(rss_before, 2), peak_rss_gib=round(_peak_rss_gib(), 2))
    del model, result, probs
    return report


def _peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB  # KiB on Linux


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default=str(DEFAULT_CONFIG))
    parser.add_argument('--size', nargs=2, type=positive_int, default=(4320, 7680),
                        metavar=('H', 'W'))
    parser.add_argument('--device', type=torch_device,
                        default='cuda' if torch.cuda.is_available() else 'cpu',
                        help='cpu, cuda or cuda:N')
    parser.add_argument('--precision', nargs='+', default=['fp32'],
                        choices=['fp32', 'fp16', 'bf16'])
    parser.add_argument('--json', help='append the reports to this file (JSON lines)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction, type=key_value)
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    check_exists('--config', args.config)
    check_out_file('--json', args.json)
    cfg = read_config(args.config, args.cfg_options, '--config')
    if not isinstance(cfg.get('model'), dict):
        raise UsageError(f'--config {args.config}: it has no model')
    source = with_cfg_options(f'the model of --config {args.config}', args.cfg_options)
    for precision in args.precision:
        report = measure(cfg, args.size, args.device, precision, source)
        print(json.dumps(report), flush=True)
        if args.json:
            with open(args.json, 'a') as file:
                file.write(json.dumps(report) + '\n')
        if args.device.startswith('cuda'):
            torch.cuda.empty_cache()
    return 0


if __name__ == '__main__':
    sys.exit(run_main(main))
