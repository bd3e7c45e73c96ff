"""Run one of mmseg's own dataset converters, as shipped in the mmsegmentation wheel.

    python tools/dataset_converters/mmseg_converter.py NAME [ARGS...]

NAME is a script of ``mmseg/.mim/tools/dataset_converters/`` (with or without ``.py``);
ARGS go to it unchanged (``NAME --help`` lists them). The ones this project needs:

  # PASCAL Context: VOC2010/SegmentationClassContext/*.png (0..59) and
  # VOC2010/ImageSets/SegmentationContext/{train,val}.txt; needs the Detail API
  python tools/dataset_converters/mmseg_converter.py pascal_context \\
      data/VOCdevkit data/VOCdevkit/VOC2010/trainval_merged.json

  # COCO-Stuff164k: annotations/{train2017,val2017}/*_labelTrainIds.png (171 classes)
  python tools/dataset_converters/mmseg_converter.py coco_stuff164k data/coco_stuff164k --nproc 8

  # Cityscapes: gtFine/**/*_gtFine_labelTrainIds.png and {train,val,test}.txt;
  # needs cityscapesscripts
  python tools/dataset_converters/mmseg_converter.py cityscapes data/cityscapes --nproc 8
"""
import argparse
import importlib.util
import os
import os.path as osp
import runpy
import sys

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# Converter -> (module it imports beyond mmseg's stack, what it is and how to install it).
EXTRA_DEPENDENCIES: dict[str, tuple[str, str]] = {
    'pascal_context': (
        'detail', "the PASCAL Context 'Detail' API (pip package 'detail'): pip install "
        "'git+https://github.com/zhanghang1989/detail-api.git#subdirectory=PythonAPI'"),
    'cityscapes': (
        'cityscapesscripts', "the Cityscapes scripts for json2labelImg "
        "(pip package 'cityscapesscripts'): pip install cityscapesscripts"),
}


def converters_dir() -> str:
    """``.mim/tools/dataset_converters`` of the installed mmsegmentation wheel."""
    mmseg_dir = importlib.util.find_spec('mmseg').submodule_search_locations[0]
    return osp.join(mmseg_dir, '.mim', 'tools', 'dataset_converters')


def available_converters() -> list[str]:
    return sorted(osp.splitext(name)[0] for name in os.listdir(converters_dir())
                  if name.endswith('.py') and not name.startswith('_'))


def find_converter(name: str) -> str:
    if name not in available_converters():
        raise SystemExit(f"unknown mmseg converter '{name}'; available in {converters_dir()}: "
                         f"{', '.join(available_converters())}")
    return osp.join(converters_dir(), name + '.py')


def check_extra_dependency(name: str) -> None:
    """Fail early, in one line, if the converter's extra dependency is missing."""
    if name not in EXTRA_DEPENDENCIES:
        return
    module, install = EXTRA_DEPENDENCIES[name]
    if importlib.util.find_spec(module) is None:
        raise SystemExit(f"mmseg's {name} converter needs the module '{module}', "
                         f'which is not installed: {install}')


def install_mmcv_ops_standin() -> None:
    """Import mmseg_selfattn from this checkout, as tools/test.py does, before mmseg is used."""
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    import mmseg_selfattn  # noqa: F401  (its import installs the mmcv.ops stand-in)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"available: {', '.join(available_converters())}")
    parser.add_argument('name', help="converter name, e.g. 'coco_stuff164k'")
    parser.add_argument('args', nargs=argparse.REMAINDER, help="the converter's own arguments")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name = args.name.removesuffix('.py')
    path = find_converter(name)
    check_extra_dependency(name)
    install_mmcv_ops_standin()  # after the checks, so that their errors come fast and alone
    saved_argv = sys.argv
    sys.argv = [path, *args.args]  # the converter parses sys.argv itself
    try:
        runpy.run_path(path, run_name='__main__')
    finally:
        sys.argv = saved_argv


if __name__ == '__main__':
    main()
