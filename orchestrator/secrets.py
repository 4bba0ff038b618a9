"""Recognising credentials, so that none reaches a spec, profile, registry file or Ray runtime_env.

maestro never needs a credential in its inputs: the nodes' own (environment, instance role) are
used. A value that looks like one is refused, and ``redact`` hides it wherever a plan shows it.
"""

from __future__ import annotations

import re

# Names of variables that hold credentials (AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN, DB_PASSWORD, ...).
SECRET_NAME = re.compile(r"(?i).*(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|SESSION_KEY|API_KEY"
                         r"|ACCESS_KEY).*")
# Values that carry one: NAME=secret assignments, user:password@ in URLs, token/signature queries.
SECRET_VALUE = re.compile(
    r"(?i)(?:[A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY)[A-Z0-9_]*\s*=\s*\S)"
    r"|(?:[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@)"
    r"|(?:[?&](?:token|access_token|x-amz-signature|x-amz-credential|x-amz-security-token|sig|signature|"
    r"password|secret)=)")
REDACTED = "***"


def secret_in(name: str, value: str) -> bool:
    """Whether a (name, value) setting carries a credential, by its name or its value."""
    return bool(SECRET_NAME.fullmatch(name) and value) or bool(SECRET_VALUE.search(value))


def redact(env: dict[str, str]) -> dict[str, str]:
    return {k: REDACTED if secret_in(k, v) else v for k, v in env.items()}
