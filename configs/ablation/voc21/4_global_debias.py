_base_ = './3_outlier.py'
model = dict(apply_global_debias=True)
