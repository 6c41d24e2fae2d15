"""Adaptive folders: one model folder that follows the device's memory without the float
source (``convert --adaptive``).

The folder is the top plan of a ``PlanSet``, written as any ``convert`` folder (stock
``mlx_lm.load`` opens it at that plan), plus ``lsaq_plans.json`` (the set; every smaller
plan gives no module more bits than the top plan does) and ``lsaq_adaptive/`` (a layer
store, ``storage.layer_store``, of the module settings the smaller plans use that the
converting quantizer made better than rounding the stored weights would, chosen by gain
per byte under a size cap on the whole folder; ``adaptive.store``). A setting is kept
as the steps of its grid and codes from the stored weights (``adaptive.steps``: about
0.3x its bytes whole). A swap rebuilds a module from
that store when it holds it, else rounds the stored (top) weights to the new setting;
the top setting itself is read back as stored, bit for bit.
"""
