"""Stage 3, plans: ``QuantPlan``/``PlanSet`` (plan.py), the cost model (cost.py), the
multiple-choice knapsack (knapsack.py), the methods (methods.py), and the planner that
gathers their inputs and caches them (planner.py)."""
