"""How the suite is spread over the machine's cores (pytest-xdist, `--dist loadgroup`).

Each module runs whole on one worker, so that its module-scoped fixtures (a
trained champion, a server, a PostgreSQL cluster) start once, as in a run on
one core. A test that must share a worker with another module's tests names
the group itself (`@pytest.mark.xdist_group("name")`).

The modules that take longest start first: the scheduler hands out the rest
as workers come free, so no worker is left with a long module at the end
while the others idle. The list comes from `--durations` (docs/tests.md);
a module missing from it only starts later, which costs time, not
correctness.
"""

import pytest

# Longest first, from the last measured run (docs/tests.md keeps the table).
LONGEST_FIRST = ()


def module_of(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(module_of(item)))
    rank = {module: index for index, module in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(module_of(item), len(rank)))
