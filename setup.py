from pathlib import Path

from setuptools import find_packages, setup

# Open-ended requirements, so that users keep their own torch and mmcv (full mmcv<2.2.0
# or mmcv-lite: mmseg needs one of them, installed separately). requirements/*.txt pin
# the tested stack that `make demo` / `make test` install.
setup(
    name='mmseg_selfattn',
    version='0.1.0',
    description='Training-free open-vocabulary semantic segmentation with a frozen CLIP ViT, '
    'as an MMSegmentation extension',
    long_description=(Path(__file__).parent / 'README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    python_requires='>=3.9',
    packages=find_packages(include=['mmseg_selfattn', 'mmseg_selfattn.*']),
    package_data={'mmseg_selfattn': ['model_configs/*.json']},
    install_requires=[
        'torch>=2.0', 'mmengine>=0.10,<1.0', 'mmsegmentation>=1.2,<1.3', 'open_clip_torch>=2.24',
        'ftfy', 'regex', 'numpy', 'matplotlib', 'imgviz', 'safetensors', 'tqdm'
    ],
    extras_require={'tests': ['pytest', 'scikit-learn', 'scikit-image']},
)
