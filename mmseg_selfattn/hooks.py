"""Runner hooks of the evaluation loop."""
from mmengine.hooks import Hook
from mmseg.registry import HOOKS


@HOOKS.register_module()
class ClassCountCheckHook(Hook):
    """Fails before the first test image when the model's class list and the test
    dataset's classes differ in number.

    mIoU pairs predicted label k with the dataset's class k, so a list with a class
    too many or too few shifts or drops classes silently. Models without a
    ``class_names`` attribute are not checked.
    """

    def before_test(self, runner) -> None:
        model = getattr(runner.model, 'module', runner.model)  # distributed wrapper
        class_names = getattr(model, 'class_names', None)
        if class_names is None:
            return
        dataset = runner.test_loop.dataloader.dataset
        dataset_classes = dataset.metainfo.get('classes') or ()
        if len(class_names) != len(dataset_classes):
            first_names = ', '.join(synonyms[0] if isinstance(synonyms, tuple) else synonyms
                                    for synonyms in class_names[:3])
            raise ValueError(
                f'the model has {len(class_names)} classes ({first_names}, ...; from '
                f'model.name_path / model.class_names) but the test dataset '
                f'{type(dataset).__name__} has {len(dataset_classes)} '
                f'({", ".join(dataset_classes[:3])}, ...): every class line must match one '
                'dataset class, in label order. Use the class-name file of this dataset.')


def with_class_count_check(cfg) -> None:
    """Adds :class:`ClassCountCheckHook` to ``cfg.custom_hooks`` unless it is there."""
    hooks = list(cfg.get('custom_hooks') or [])
    if not any(hook.get('type') in ('ClassCountCheckHook', ClassCountCheckHook)
               for hook in hooks):
        hooks.append(dict(type='ClassCountCheckHook'))
    cfg.custom_hooks = hooks
