"""Secret redaction over the spellings real configs and environments use (docs/TRACKING.md, "Secrets").

The rule: a key naming a secret (token, password, secret, api key, access key, private key,
signature, credentials, ...) has its value masked wherever it sits in the config; a name ending in
a path, file, url, count or type word (`token_path`, `num_tokens`, `token_type`) is not a secret;
the values found are masked in every other string too, and so are secret-looking environment
variables. The tables list names as snake_case, camelCase (also with acronyms: HFToken),
UPPER_CASE, hyphenated (HTTP-header style), dotted and with a service prefix, glued or not.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest

from dalle2_decoder.tracking.redact import MASK, redact, redact_string, secrets_in

SECRET_NAMES = [
    # snake_case
    "token",
    "hf_token",
    "api_key",
    "wandb_api_key",
    "access_token",
    "refresh_token",
    "auth_token",
    "sas_token",
    "client_secret",
    "secret_key",
    "private_key",
    "access_key",
    "password",
    "db_password",
    "passwd",
    "credentials",
    "signature",
    "aws_secret_access_key",
    "aws_session_token",
    # camelCase, acronyms included
    "hfToken",
    "apiKey",
    "accessToken",
    "refreshToken",
    "clientSecret",
    "secretKey",
    "privateKey",
    "authToken",
    "wandbApiKey",
    "awsSecretAccessKey",
    "HFToken",
    "APIToken",
    "SASToken",
    "APIKey",
    "GitHubToken",
    "AWSAccessKey",
    "GCPPrivateKey",
    "HfToken",
    # UPPER_CASE (environment variables)
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "WANDB_API_KEY",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GITHUB_TOKEN",
    "OPENAI_API_KEY",
    "PASSWORD",
    # hyphenated (HTTP headers, query parameters)
    "x-api-key",
    "X-API-Key",
    "api-key",
    "auth-token",
    "X-Amz-Signature",
    "X-Amz-Credential",
    # dotted and prefixed, glued or not
    "hub.token",
    "my_hf_token",
    "MY_SERVICE_TOKEN",
    "service.api_key",
    "PGPASSWORD",
    "HFTOKEN",
    "hftoken",
]
NOT_SECRET_NAMES = [
    "token_path",
    "tokenPath",
    "TOKEN_PATH",
    "hf_token_path",
    "token_file",
    "token_url",
    "token_type",
    "tokenizer",
    "tokenizer_path",
    "num_tokens",
    "max_tokens",
    "text_tokens",
    "key",
    "keys",
    "sort_key",
    "api_url",
    "wandb_run_id",
    "keyframes",
    "secret_count",
    "password_file",
]
SECRET_VALUE = "s3cr3t-VALUE-42xyz"


def placements(name: str, value: Any) -> Dict[str, Any]:
    """The same key at the top, nested, inside a list of objects, and two lists deep."""
    return {
        "top": {name: value, "other": 1},
        "nested": {"tracker": {"save": {name: value, "save_to": "local"}}},
        "in a list": {"tracker": {"save": [{"save_to": "local"}, {name: value}]}},
        "deep": {"data": {"sources": [[{"options": {name: value}}]]}},
    }


@pytest.mark.parametrize("name", SECRET_NAMES)
def test_a_secret_key_is_masked_wherever_it_sits(name):
    """A key naming a secret has its value masked at the top level, nested in objects and inside
    lists of objects; the value appears nowhere in the result, and `secrets_in` finds it (so it is
    masked in every printed or logged string too), where an unrelated string mentioning it is
    masked as well."""
    for where, config in placements(name, SECRET_VALUE).items():
        config = {**config, "note": f"started with {SECRET_VALUE} at noon"}
        masked = redact(config)
        text = json.dumps(masked)
        assert MASK in text, (name, where)
        assert SECRET_VALUE not in json.dumps(redact(config, known_secrets=secrets_in(config))), (name, where)
        assert SECRET_VALUE in secrets_in(config), (name, where)
        assert json.dumps(config).count(SECRET_VALUE) == 2  # the input is left as it was


@pytest.mark.parametrize("name", NOT_SECRET_NAMES)
def test_a_key_that_only_mentions_a_secret_word_is_kept(name):
    """Paths, files, URLs, counts and types named after a secret (`token_path`, `num_tokens`,
    `token_type`) and words that merely contain one (`tokenizer`, `keyframes`) keep their value."""
    for where, config in placements(name, "/home/me/some/value.txt").items():
        assert redact(config) == config, (name, where)
        assert secrets_in(config) == [], (name, where)


@pytest.mark.parametrize("name", [n for n in SECRET_NAMES if n.upper() == n and "." not in n and "-" not in n])
def test_a_secret_environment_variable_is_masked_in_every_string(name, monkeypatch):
    """An environment variable whose name denotes a secret (as the tables spell them for
    environments: upper case, with or without a prefix) has its value masked wherever it appears
    in the config's strings."""
    monkeypatch.setenv(name, SECRET_VALUE)
    masked = redact({"data": {"webdataset_base_url": f"pipe:fetch --auth {SECRET_VALUE} shard-{{}}.tar"}})
    assert SECRET_VALUE not in json.dumps(masked), name


@pytest.mark.parametrize("name", ["TOKEN_PATH", "NUM_TOKENS", "TOKENIZERS_PARALLELISM", "WANDB_RUN_ID", "SORT_KEY"])
def test_an_environment_variable_that_is_no_secret_is_left_alone(name, monkeypatch):
    """An environment variable named for a path, count or id (TOKEN_PATH, NUM_TOKENS) is no secret:
    its value stays in the config's strings."""
    monkeypatch.setenv(name, "/home/me/plain-value")
    assert redact({"note": "/home/me/plain-value"}) == {"note": "/home/me/plain-value"}, name


@pytest.mark.parametrize(
    "parameter",
    ["token", "access_token", "sig", "X-Amz-Signature", "X-Amz-Credential", "apiKey", "api-key", "hf_token"],
)
def test_secret_query_parameters_are_masked_in_urls(parameter):
    """A URL's query parameter whose name denotes a secret loses its value, in any spelling, as
    the first or a later parameter; other parameters keep theirs."""
    for url in (
        f"https://host/shards/{{}}.tar?{parameter}={SECRET_VALUE}&part=1",
        f"https://host/shards/{{}}.tar?part=1&{parameter}={SECRET_VALUE}",
    ):
        masked = redact_string(url)
        assert SECRET_VALUE not in masked and f"{parameter}={MASK}" in masked and "part=1" in masked
        assert SECRET_VALUE in secrets_in({"data": {"url": url}})
    plain = "https://host/shards/{}.tar?token_type=bearer&part=1"
    assert redact_string(plain) == plain


@pytest.mark.parametrize("scheme", ["https", "http", "s3", "ftp", "git+ssh"])
def test_url_passwords_are_masked_for_every_scheme(scheme):
    """The password of a URL's user info is masked (the user name kept), whatever the scheme."""
    url = f"{scheme}://someone:{SECRET_VALUE}@example.org/shards/{{}}.tar"
    assert redact_string(url) == f"{scheme}://someone:{MASK}@example.org/shards/{{}}.tar"
    assert SECRET_VALUE in secrets_in({"data": {"webdataset_base_url": url}})
