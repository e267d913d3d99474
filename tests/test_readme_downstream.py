"""The README's downstream pytest example runs, as a user's own test file would."""

import pathlib

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
HEADING = "## Checking equivalence and testing your models"


def downstream_example() -> str:
    section = README.read_text().split(HEADING, 1)[1]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_readme_downstream_example_passes():
    code = downstream_example()
    assert len(code.strip().splitlines()) <= 14
    namespace: dict = {}
    exec(
        compile(code, "README-downstream-example", "exec"), namespace
    )  # in-process: no second torch import
    tests = [value for name, value in namespace.items() if name.startswith("test_")]
    assert len(tests) == 2
    for test in tests:  # @given tests run their examples when called
        test()
