"""One setting at a time, for what runs while a DAG file is parsed (schedules, the timezone, the
trigger forms' defaults).

:func:`read_setting` reads one ``WBC_*`` variable and validates it exactly as
:class:`~wbc_tasks.core.settings.Settings` validates that field (its type, bounds and validators;
its default when the variable is unset or empty), without reading any other variable: a malformed
variable that parsing does not need cannot stop a DAG loading, and the one it needs is refused
with its name. Tasks read the whole settings (``get_settings()``), so a malformed variable fails
the run that needs it, naming it.
"""

from __future__ import annotations

import os
from functools import cache
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from wbc_tasks.core.settings import Settings, SettingsError, env_variable


@cache
def _validator(name: str) -> TypeAdapter[Any]:
    """The field's type with its constraints and validators (what ``Settings`` checks it with)."""
    field = Settings.model_fields[name]
    annotation: Any = field.annotation
    if field.metadata:
        annotation = Annotated[(annotation, *field.metadata)]
    return TypeAdapter(annotation, config={"arbitrary_types_allowed": True})


def read_setting(name: str) -> Any:
    """The setting ``name`` (a :class:`Settings` field) from its environment variable alone.

    The variable's name is matched ignoring case and an empty one counts as unset, as
    :class:`Settings` does; the value (or the field's default) goes through the field's own
    validation. A malformed value raises :class:`SettingsError` naming the variable. Fields derived
    from ``WBC_HOME`` when unset (the work folder, the database URIs) cannot be read alone.
    """
    field = Settings.model_fields.get(name)
    if field is None:
        raise TypeError(f"unknown setting: {name!r}")
    if field.is_required():
        raise TypeError(f"setting {name!r} derives from WBC_HOME when unset: read it with get_settings()")
    variable = env_variable(name)
    wanted = variable.lower()
    raw = next((value for key, value in os.environ.items() if key.lower() == wanted), "")
    value = raw if raw != "" else field.get_default(call_default_factory=True, validated_data={})
    try:
        return _validator(name).validate_python(value)
    except ValidationError as exc:
        problems = "; ".join(e["msg"] for e in exc.errors())
        raise SettingsError(f"setting {variable}={value!r}: {problems}") from None
