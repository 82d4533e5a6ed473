"""Shared by the test modules, which import it as `helpers` (pytest puts tests/ on sys.path, as for
`from test_convert import ...`)."""
import pytest

# All-zero blocks divide by zero on purpose (1/0 = inf, 0 * inf = NaN -> code 0); numpy, under the
# interpreter, warns about it. For a module's pytestmark.
IGNORE_ZERO_BLOCK_WARNINGS = pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning",
                                                        "ignore:invalid value:RuntimeWarning")
