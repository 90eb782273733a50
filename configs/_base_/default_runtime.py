# mmpretrain's runtime, plus: a resumed training repeats the uninterrupted
# one exactly. mmsn's RNGStateHook (registered by the model bases'
# custom_imports) saves the random generators in every checkpoint and
# restores them on resume. A config that sets its own custom_hooks replaces
# this list: keep RNGStateHook in it.
_base_ = ['mmpretrain::_base_/default_runtime.py']

custom_hooks = [dict(type='RNGStateHook')]
