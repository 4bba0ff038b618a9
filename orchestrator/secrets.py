"""Recognising credentials, so that none reaches a spec, profile, registry file or Ray runtime_env.

maestro never needs a credential in its inputs: the nodes' own (environment, instance role) are
used. A value that looks like one is refused, and ``redact`` hides it wherever a plan shows it.
"""

from __future__ import annotations

import re
from typing import Any

# Names of variables that hold credentials (AWS_SECRET_ACCESS_KEY, GITHUB_TOKEN, DB_PASSWORD, ...).
SECRET_NAME = re.compile(r"(?i).*(SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|PRIVATE_KEY|SESSION_KEY|API_KEY"
                         r"|ACCESS_KEY).*")
# Values that carry one: NAME=secret assignments, user:password@ in URLs, token/signature queries
# (S3, GCS and Azure signed URLs), and HTTP Authorization headers.
SECRET_VALUE = re.compile(
    r"(?i)(?:[A-Z0-9_]*(?:SECRET|TOKEN|PASSWORD|PASSWD|CREDENTIAL|API_KEY|ACCESS_KEY)[A-Z0-9_]*\s*=\s*\S)"
    r"|(?:[a-z][a-z0-9+.-]*://[^/\s:@]+:[^/\s@]+@)"
    r"|(?:[?&](?:token|access_token|x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential|sig|signature|password|secret|api_key|apikey)=)"
    r"|(?:authorization:\s*\S)|(?:\bbearer\s+[A-Za-z0-9._~+/=-]{16,})")
REDACTED = "***"


def secret_in(name: str, value: str) -> bool:
    """Whether a (name, value) setting carries a credential, by its name or its value."""
    return bool(SECRET_NAME.fullmatch(name) and value) or bool(SECRET_VALUE.search(value))


def secret_path(tree: Any, path: str, by_name: bool = True) -> str | None:
    """Where a parsed document (mappings, lists, strings) carries a credential: the dotted path of
    the first string that does, judged by its value and, with ``by_name``, by the key holding it
    (``env_vars: {GITHUB_TOKEN: ...}``). None when it carries none. The path, never the value, is
    what an error may show."""
    if isinstance(tree, str):
        name = path.rsplit(".", 1)[-1] if by_name else ""
        return path if secret_in(name, tree) else None
    if isinstance(tree, dict):
        items = [(f"{path}.{key}" if path else str(key), value) for key, value in tree.items()]
    elif isinstance(tree, list | tuple):
        items = [(f"{path}[{i}]", value) for i, value in enumerate(tree)]
    else:
        return None
    for where, value in items:
        found = secret_path(value, where, by_name)
        if found is not None:
            return found
    return None


def redact(env: dict[str, str]) -> dict[str, str]:
    return {k: REDACTED if secret_in(k, v) else v for k, v in env.items()}
