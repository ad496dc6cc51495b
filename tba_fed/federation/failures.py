"""How a site's failure reaches the server, and how the server writes any site's failure down: one short line.

A site that cannot serve a request answers with a *failure reply*: its ``meta`` record (its name and the
echo of the request, as in every reply) and a ``failure`` record holding only the status (``refused``:
a `SiteRefusal`, ``error``: anything else) and the text `site_audit` lets leave the site (a refusal's
text, or a field and a fixed sentence). Raising instead would hand Flower the exception: in a simulation
Ray turns it into a traceback, with colour codes, that Flower prints and passes to the server as the
error's reason, and the server would know the site only by its node id.

What still arrives as a Flower error (a site that is offline, a crashed ClientApp, a refusal in the SecAgg+
round, whose replies must be Flower's: `refusal_error`) is reduced to one line by `error_reason`: Flower's own reasons
as they are, a ClientApp's exception by its text only when it is one of the kinds written to leave a
site (`LEAVING`), else by its class alone.
"""

from __future__ import annotations

import re
from typing import Any

from flwr.app import ConfigRecord, Error, Message, RecordDict

from ..errors import SiteRefusal, TBAInputError, one_line, strip_escapes
from .envelope import echo
from .flower_internals import ErrorCode

FAILURE = "failure"
STATUSES = ("refused", "error")
# exceptions whose text is written to leave a site: it depends on the request and the site's configuration
# alone (SiteRefusal and its kinds), or names a field and a fixed sentence (SiteError), or the shape of a
# secure-sum request (SecureSumRefused)
LEAVING = frozenset({"SiteError", "SiteRefusal", "PolicyRefusal", "BudgetExceeded", "RunTermsChanged",
                     "SecureSumRefused"})
# flwr/supernode/runtime/run_clientapp.py: "<class 'pkg.Kind'>:<'text'>"
_RAISED = re.compile(r"<class '([\w.]+)'>:<'(.*)'>", re.S)
# a traceback's closing line per exception, as Ray's error text quotes it: "pkg.Kind: text"
_TRACEBACK_LINE = re.compile(r"^([A-Za-z_][\w.]*): (.+)$", re.M)


def failure_reply(msg: Message, err: TBAInputError, site: str | None) -> Message:
    """The reply of a site that could not serve `msg`: `err` is what `site_audit` lets leave the site (a
    `SiteRefusal` or a `SiteError`); `site` its name, None if it could not be read."""
    meta: dict[str, Any] = {**({"site": site} if site else {}), **echo(msg)}
    failure = {"status": "refused" if isinstance(err, SiteRefusal) else "error", "reason": str(err)}
    return Message(RecordDict({"meta": ConfigRecord(meta), FAILURE: ConfigRecord(failure)}), reply_to=msg)


def refusal_error(msg: Message, err: Exception) -> Message:
    """The reply of a site that will not serve `msg` where a failure reply does not fit (the secure round, whose
    replies Flower's SecAgg+ reads as legacy FitRes): a Flower error in the form the SuperNode gives a ClientApp's
    exception, which `error_reason` reads. Sent rather than raised: raised, it would be printed as a traceback
    and end the site's task process with Flower's exit code 800. `err` must be one of the kinds in `LEAVING`."""
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=f"{type(err)}:<'{err}'>"), reply_to=msg)


def decode_failure(content: RecordDict) -> tuple[str, str] | None:
    """A failure reply's status and reason (one line), or None for any other reply. A failure reply carries
    nothing else: arrays or other records beside it are refused, so nothing of it can be summed."""
    record = content.config_records.get(FAILURE)
    if record is None:
        return None
    extra = sorted(set(content.config_records) - {"meta", FAILURE}) + sorted(content.array_records) \
        + sorted(content.metric_records)
    if extra:
        raise TBAInputError(FAILURE, f"a failure reply carries records beside it: {extra}")
    status = str(record.get("status", ""))
    if status not in STATUSES:
        raise TBAInputError(f"{FAILURE}.status", f"{one_line(status, 40)!r} is not one of {list(STATUSES)}")
    return status, one_line(str(record.get("reason", "")))


def _raised(text: str) -> tuple[str, str] | None:
    """The exception a ClientApp raised, as (qualified class, text), from Flower's error reason: the SuperNode's
    ``<class ...>:<'...'>`` form, or else what a (Ray) traceback's closing lines name: the first kind in
    `LEAVING`, or the first kind at all."""
    found = _RAISED.fullmatch(text.strip())
    if found:
        return found[1], found[2]
    named = _TRACEBACK_LINE.findall(text)
    return next((line for line in named if line[0].rsplit(".", 1)[-1] in LEAVING), named[0] if named else None)


def error_reason(error: Error) -> str:
    """One line for a Flower error reply in the server's report and log."""
    code, text = int(error.code), str(error.reason)
    if code != ErrorCode.CLIENT_APP_RAISED_EXCEPTION:
        return f"site error {code}: {one_line(text)}"  # Flower's own words (node unavailable, app not loaded, ...)
    raised = _raised(strip_escapes(text))
    if raised is not None and raised[0].rsplit(".", 1)[-1] in LEAVING:
        return f"site error {code}: {one_line(raised[1])}"
    kind = raised[0].rsplit(".", 1)[-1] if raised is not None else "an exception"
    return (f"site error {code}: its ClientApp raised {kind}, whose text is not shown here (it may quote the site's "
            "data); the site's own log has it")
