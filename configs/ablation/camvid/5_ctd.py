_base_ = './4_global_debias.py'
model = dict(apply_ctd=True)
