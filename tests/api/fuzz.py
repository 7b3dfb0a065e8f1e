"""Fuzzes the syncfleet API from its own OpenAPI document with schemathesis.

    fuzz.py <base url> <token>

The document is first checked with openapi-spec-validator. Then every documented operation
gets generated requests (valid and invalid); the run fails on any 5xx, on a status code the
document does not list, on a wrong content type, or on a body that does not match the response
schema. The event stream is left out: it stays open while a run is
active, and the end-to-end SSE test covers it.
"""
import json
import subprocess
import sys
import urllib.request
from pathlib import Path

from openapi_spec_validator import validate

base, token = sys.argv[1], sys.argv[2]

# The document itself must be a valid OpenAPI 3.1 document.
with urllib.request.urlopen(f"{base}/openapi.json", timeout=20) as response:
    document = json.load(response)
validate(document)
print(f"openapi.json is a valid OpenAPI {document['openapi']} document", flush=True)

st = Path(sys.executable).parent / "st"
cmd = [
    str(st), "run", f"{base}/openapi.json",
    "--url", base,
    "--header", f"Authorization: Bearer {token}",
    "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance",
    "--exclude-path-regex", "/events$",
    "--max-examples", "40",
    "--request-timeout", "20",
    "--seed", "4242",
    "--no-color",
]
print(" ".join("'Authorization: Bearer ***'" if "Bearer" in c else c for c in cmd), flush=True)
sys.exit(subprocess.run(cmd).returncode)
