"""One exception type for bad input, so recipes can print a single clear line instead of a traceback."""


class MinituneError(Exception):
    """Bad input or an unsupported setting. The message names the field and, where there is one, the fix."""


class ConfigValueError(MinituneError):
    """A config value out of its range, raised by a config dataclass's `__post_init__`.

    `field` is the name inside its section; the config loader prefixes the section (`optim.lr=...`).
    """

    def __init__(self, field: str, value, requirement: str):
        self.field, self.value, self.requirement = field, value, requirement
        super().__init__(f"{field}={value!r} {requirement}")


def require(ok: bool, field: str, value, requirement: str) -> None:
    """Raises ConfigValueError(field, value, requirement) unless `ok`."""
    if not ok:
        raise ConfigValueError(field, value, requirement)
