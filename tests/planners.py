"""A planner that hands out plans prepared by the test, by budget (the engine's
``Planner`` interface: ``plans``, ``model_in_memory``, ``release``)."""


class FixedPlanner:
    def __init__(self, by_budget: dict):
        self.by_budget = by_budget

    def plans(self, request) -> list:
        return [self.by_budget[b] for b in request.bits_budgets]

    def model_in_memory(self):
        return None

    def release(self) -> None:
        pass
