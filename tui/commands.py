"""The app's entries in Textual's command palette (Ctrl+P): auto mode, plans, budgets,
forced swaps, the conversation."""

from functools import partial

from textual.command import DiscoveryHit, Hit, Hits, Provider


class RuntimeCommands(Provider):
    def _commands(self) -> list[tuple[str, object, str]]:
        app = self.app
        commands = [
            (f"Auto mode: turn {'off' if app.auto else 'on'}", app.action_toggle_auto,
             "follow the machine's memory through the policy"),
            ("Choose a plan or a budget…", app.action_choose_plan, "swap to a plan of the PlanSet or plan a budget"),
            ("Swap to the next smaller plan", app.action_smaller, "force a swap down"),
            ("Swap to the next larger plan", app.action_larger, "force a swap up"),
        ]
        for i, plan in enumerate(app.plans):
            commands.append((f"Swap to plan {i + 1}: {plan['bits_per_weight']:.2f} bits/weight",
                             partial(app.swap_to, i), "force this plan (turns auto mode off)"))
        commands += [("Stop the reply", app.action_stop_reply, "the prompt comes back to edit"),
                      ("Reset the conversation", app.action_reset, "forget what was said")]
        return commands

    async def discover(self) -> Hits:
        for name, callback, help_text in self._commands():
            yield DiscoveryHit(name, callback, help=help_text)

    async def search(self, query: str) -> Hits:
        matcher = self.matcher(query)
        for name, callback, help_text in self._commands():
            score = matcher.match(name)
            if score > 0:
                yield Hit(score, matcher.highlight(name), callback, help=help_text)
