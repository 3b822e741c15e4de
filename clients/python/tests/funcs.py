"""Functions the executor tests run on workers.

Apart from the tests so that a worker imports only this small module (a
test module would import pytest in every job).
"""


def square(x: int) -> int:
    return x * x


def divide(a: float, b: float) -> float:
    return a / b


def nap(seconds: float) -> float:
    import time

    time.sleep(seconds)
    return seconds
