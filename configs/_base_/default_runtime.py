# Runtime shared by every config: evaluation only (TestLoop), no training.
default_scope = 'mmseg'
custom_imports = dict(imports=['mmseg_selfattn'], allow_failed_imports=False)

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'))

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=2000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    # every image, but only once tools/test.py --show/--show-dir sets draw
    visualization=dict(type='SegVisualizationHook', interval=1))

# fails before the first image on an empty test set or a class count that differs
# between model and dataset
# ReleaseLoaderWorkersHook: persistent workers end with the test, not at exit (no stall)
# TestTimelineHook: one log line, start-up / loop / evaluation seconds
custom_hooks = [dict(type='TestSetCheckHook'),
                dict(type='ReleaseLoaderWorkersHook'),
                dict(type='TestTimelineHook')]  # mmseg_selfattn/hooks.py

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')

log_processor = dict(by_epoch=False)
log_level = 'INFO'
load_from = None
resume = False

# TestLoop resolving test_dataloader's 'auto' batch_size / num_workers for the machine
test_cfg = dict(type='MachineAwareTestLoop')  # mmseg_selfattn/machine.py
