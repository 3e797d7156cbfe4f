"""The documents of tasks/blade_continuation.yaml, which the harness loads by path (`!function`)."""
from blade.data.corpus import continuation_items


def items(n: int = 500, seed: int = 0, **_metadata):
    """{"test": Dataset} of continuation_items(n, seed); the harness passes the task's metadata too."""
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(continuation_items(int(n), int(seed)))})
