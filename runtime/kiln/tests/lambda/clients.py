"""Real Lambda clients against a running Kiln (`lambda::*` in runtime/kiln/tests/all/lambda.rs).

boto3 creates, lists, updates, invokes (RequestResponse, Event, DryRun, LogType Tail, Qualifier)
and deletes Python, Node and Ruby handlers written as Lambda's documentation writes them; a
raising handler is a FunctionError with Lambda's payload; a wrong secret and a tampered body are
refused; the AWS CLI invokes end to end. Every check raises on failure; the last line printed is
"all lambda checks passed".

Both APIs see the same functions: a function deployed through Kiln's API (KILN_FUNCTION, an
echo) is invoked here, and `lambda-wasm` (a kiln-wasm zip of WAT_FILE) is created here and left
for the caller to invoke through Kiln's API.

Usage: clients.py ENDPOINT ACCESS_KEY_ID SECRET_ACCESS_KEY AWS_CLI LANGUAGES WAT_FILE KILN_FUNCTION
(LANGUAGES comma-separated)
"""

import base64
import io
import json
import os
import subprocess
import sys
import zipfile

import boto3
import botocore.auth
import botocore.awsrequest
import botocore.credentials
import urllib3
from botocore.config import Config
from botocore.exceptions import ClientError, WaiterError

ENDPOINT, KEY_ID, SECRET, AWS_CLI, LANGUAGES, WAT_FILE, KILN_FUNCTION = sys.argv[1:8]
ROLE = "arn:aws:iam::123456789012:role/lambda-role"

# Handlers as Lambda's documentation writes them; each answers with what its context says.
HANDLERS = {
    "python": {
        "runtime": "python3.12",
        "handler": "lambda_function.lambda_handler",
        "file": "lambda_function.py",
        "source": '''import json
import os

def lambda_handler(event, context):
    print("Received event: " + json.dumps(event))
    if event.get("fail"):
        raise ValueError("boom from python")
    return {
        "statusCode": 200,
        "body": os.environ.get("GREETING", "") + ", " + event.get("name", "") + " (%VERSION%)",
        "request_id": context.aws_request_id,
        "function_name": context.function_name,
        "memory": context.memory_limit_in_mb,
        "arn": context.invoked_function_arn,
        "remaining": context.get_remaining_time_in_millis(),
    }
''',
        "error_type": "ValueError",
    },
    "node": {
        "runtime": "nodejs22.x",
        "handler": "index.handler",
        "file": "index.mjs",
        "source": '''export const handler = async (event, context) => {
  console.log("Received event: " + JSON.stringify(event));
  if (event.fail) {
    throw new TypeError("boom from node");
  }
  return {
    statusCode: 200,
    body: (process.env.GREETING ?? "") + ", " + (event.name ?? "") + " (%VERSION%)",
    request_id: context.awsRequestId,
    function_name: context.functionName,
    memory: context.memoryLimitInMB,
    arn: context.invokedFunctionArn,
    remaining: context.getRemainingTimeInMillis(),
  };
};
''',
        "error_type": "TypeError",
    },
    "ruby": {
        "runtime": "ruby3.4",
        "handler": "lambda_function.lambda_handler",
        "file": "lambda_function.rb",
        "source": '''require 'json'

def lambda_handler(event:, context:)
  puts "Received event: #{event.to_json}"
  raise ArgumentError, "boom from ruby" if event["fail"]
  {
    statusCode: 200,
    body: "#{ENV.fetch('GREETING', '')}, #{event['name']} (%VERSION%)",
    request_id: context.aws_request_id,
    function_name: context.function_name,
    memory: context.memory_limit_in_mb,
    arn: context.invoked_function_arn,
    remaining: context.get_remaining_time_in_millis
  }
end
''',
        "error_type": "ArgumentError",
    },
}


def check(condition, what):
    if not condition:
        raise AssertionError(what)
    print("ok:", what.split(":")[0] if ":" in what else what, flush=True)


def zipped(name, source):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr(name, source)
    return buffer.getvalue()


def client(secret=SECRET):
    return boto3.client(
        "lambda",
        endpoint_url=ENDPOINT,
        region_name="us-east-1",
        aws_access_key_id=KEY_ID,
        aws_secret_access_key=secret,
        # boto3's own read timeout: a slow build answers Pending rather than outlasting it.
        config=Config(retries={"max_attempts": 1}, read_timeout=60, connect_timeout=10),
    )


def invoke(lam, name, event, **kwargs):
    response = lam.invoke(FunctionName=name, Payload=json.dumps(event).encode(), **kwargs)
    payload = response["Payload"].read()
    return response, json.loads(payload) if payload else None


def language(lam, lang):
    spec = HANDLERS[lang]
    name = f"lambda-{lang}"
    v1 = zipped(spec["file"], spec["source"].replace("%VERSION%", "v1"))
    created = lam.create_function(
        FunctionName=name,
        Runtime=spec["runtime"],
        Role=ROLE,
        Handler=spec["handler"],
        Code={"ZipFile": v1},
        Description=f"{lang} as Lambda writes it",
        Timeout=10,
        MemorySize=256,
        Environment={"Variables": {"GREETING": "Hello"}},
    )
    check(created["Runtime"] == spec["runtime"] and created["Handler"] == spec["handler"], f"{lang} created: {created}")
    check(created["Role"] == ROLE and created["Version"] == "$LATEST", f"{lang} shape: {created}")
    # Active when the build took under 10 s, else Pending until it is done, as on Lambda.
    check(created["State"] == "Active" or (created["State"] == "Pending" and created["StateReasonCode"] == "Creating"), f"{lang} state: {created}")
    check(created["CodeSize"] == len(v1), f"{lang} CodeSize: {created['CodeSize']} != {len(v1)}")
    try:
        lam.create_function(FunctionName=name, Runtime=spec["runtime"], Role=ROLE, Handler=spec["handler"], Code={"ZipFile": v1})
        raise AssertionError("a second create succeeded")
    except ClientError as e:
        check(e.response["Error"]["Code"] == "ResourceConflictException", f"{lang} create twice: {e}")
    if created["State"] == "Pending":
        print(f"{lang}: created Pending; waiting as Lambda's clients do", flush=True)
    lam.get_waiter("function_active_v2").wait(FunctionName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 300})
    active = lam.get_function_configuration(FunctionName=name)
    check(active["State"] == "Active" and active["LastUpdateStatus"] == "Successful", f"{lang} active: {active}")

    # Sync, with the log's tail.
    response, payload = invoke(lam, name, {"name": "Ada"}, LogType="Tail")
    check(response["StatusCode"] == 200 and "FunctionError" not in response, f"{lang} invoke: {response}")
    check(payload["body"] == "Hello, Ada (v1)", f"{lang} payload: {payload}")
    request_id = response["ResponseMetadata"]["RequestId"]
    check(payload["request_id"] == request_id, f"{lang} request id: {payload['request_id']} vs {request_id}")
    check(payload["function_name"] == name and str(payload["memory"]) == "256", f"{lang} context: {payload}")
    check(payload["arn"].endswith(f":function:{name}"), f"{lang} arn: {payload['arn']}")
    check(0 < payload["remaining"] <= 10_000, f"{lang} remaining time: {payload['remaining']}")
    check(response["ExecutedVersion"] == "$LATEST", f"{lang} executed version: {response}")
    log = base64.b64decode(response["LogResult"]).decode()
    check('Received event: {"name":' in log and f"START RequestId: {request_id}" in log and "REPORT" in log, f"{lang} log tail: {log!r}")

    # A raising handler: FunctionError with Lambda's payload.
    response, payload = invoke(lam, name, {"fail": True})
    check(response.get("FunctionError") == "Unhandled", f"{lang} function error: {response}")
    check(payload["errorType"] == spec["error_type"] and "boom from" in payload["errorMessage"], f"{lang} error payload: {payload}")
    trace = payload.get("stackTrace") or payload.get("trace")
    check(isinstance(trace, list) and trace, f"{lang} error trace: {payload}")

    # Event and DryRun.
    response = lam.invoke(FunctionName=name, InvocationType="Event", Payload=b'{"name": "later"}')
    check(response["StatusCode"] == 202, f"{lang} event: {response}")
    response = lam.invoke(FunctionName=name, InvocationType="DryRun")
    check(response["StatusCode"] == 204, f"{lang} dry run: {response}")

    # New code, published; the old version still answers by its qualifier.
    first = lam.publish_version(FunctionName=name)["Version"]
    updated = lam.update_function_code(FunctionName=name, ZipFile=zipped(spec["file"], spec["source"].replace("%VERSION%", "v2")), Publish=True)
    second = updated["Version"]
    check(second != "$LATEST" and int(second) > int(first), f"{lang} published: {first} then {second}")
    _, payload = invoke(lam, name, {"name": "Bo"})
    check(payload["body"] == "Hello, Bo (v2)", f"{lang} new code: {payload}")
    response, payload = invoke(lam, name, {"name": "Bo"}, Qualifier=first)
    check(payload["body"] == "Hello, Bo (v1)" and response["ExecutedVersion"] == first, f"{lang} qualifier: {response} {payload}")

    # New configuration: environment and memory.
    configured = lam.update_function_configuration(FunctionName=name, Environment={"Variables": {"GREETING": "Hej"}}, MemorySize=512)
    check(configured["MemorySize"] == 512 and configured["Environment"]["Variables"] == {"GREETING": "Hej"}, f"{lang} configured: {configured}")
    _, payload = invoke(lam, name, {"name": "Cy"})
    check(payload["body"] == "Hej, Cy (v2)" and str(payload["memory"]) == "512", f"{lang} new config: {payload}")
    got = lam.get_function(FunctionName=name)["Configuration"]
    check(got["Handler"] == spec["handler"] and got["Description"] == f"{lang} as Lambda writes it", f"{lang} get: {got}")
    versions = [v["Version"] for v in lam.list_versions_by_function(FunctionName=name)["Versions"]]
    check(versions[0] == "$LATEST" and first in versions and second in versions, f"{lang} versions: {versions}")
    return name


def refusals(lam, name):
    try:
        client(secret=SECRET[:-1] + ("A" if SECRET[-1] != "A" else "B")).invoke(FunctionName=name, Payload=b"{}")
        raise AssertionError("a wrong secret was accepted")
    except ClientError as e:
        check(e.response["Error"]["Code"] == "InvalidSignatureException", f"wrong secret refused: {e}")
    try:
        lam.invoke(FunctionName="no-such-function", Payload=b"{}")
        raise AssertionError("a missing function was invoked")
    except ClientError as e:
        check(e.response["Error"]["Code"] == "ResourceNotFoundException", f"missing function: {e}")
    try:
        lam.create_function(FunctionName="layered", Runtime="python3.12", Role=ROLE, Handler="a.b",
                            Code={"ZipFile": zipped("a.py", "def b(e, c): return 1")}, Layers=["arn:aws:lambda:us-east-1:1:layer:x:1"])
        raise AssertionError("layers were accepted")
    except ClientError as e:
        check(e.response["Error"]["Code"] == "InvalidParameterValueException" and "Layers" in str(e), f"layers refused: {e}")
    # A body changed after signing.
    body = json.dumps({"name": "signed"}).encode()
    url = f"{ENDPOINT}/2015-03-31/functions/{name}/invocations"
    request = botocore.awsrequest.AWSRequest(method="POST", url=url, data=body)
    botocore.auth.SigV4Auth(botocore.credentials.Credentials(KEY_ID, SECRET), "lambda", "us-east-1").add_auth(request)
    prepared = request.prepare()
    http = urllib3.PoolManager()
    good = http.request("POST", url, body=body, headers=dict(prepared.headers))
    check(good.status == 200, f"a signed request: {good.status} {good.data!r}")
    tampered = http.request("POST", url, body=json.dumps({"name": "tampered"}).encode(), headers=dict(prepared.headers))
    check(tampered.status == 403 and tampered.headers.get("x-amzn-ErrorType") == "InvalidSignatureException",
          f"a tampered body refused: {tampered.status} {tampered.headers}")


def aws_cli(name, workdir):
    env = dict(os.environ, AWS_ACCESS_KEY_ID=KEY_ID, AWS_SECRET_ACCESS_KEY=SECRET, AWS_DEFAULT_REGION="us-east-1")
    out = os.path.join(workdir, "out.json")
    done = subprocess.run(
        [AWS_CLI, "lambda", "invoke", "--endpoint-url", ENDPOINT, "--function-name", name,
         "--payload", '{"name": "cli"}', out],
        env=env, capture_output=True, text=True, timeout=300)
    check(done.returncode == 0, f"aws lambda invoke: {done.returncode} {done.stdout} {done.stderr}")
    check(json.loads(done.stdout)["StatusCode"] == 200, f"aws cli status: {done.stdout}")
    with open(out) as f:
        check("cli" in json.load(f)["body"], "aws cli payload")
    listed = subprocess.run([AWS_CLI, "lambda", "list-functions", "--endpoint-url", ENDPOINT], env=env,
                            capture_output=True, text=True, timeout=300)
    check(listed.returncode == 0 and name in listed.stdout, f"aws lambda list-functions: {listed.stderr}")


def both_apis(lam):
    response = lam.invoke(FunctionName=KILN_FUNCTION, Payload=b"raw bytes, not JSON")
    check(response["Payload"].read() == b"raw bytes, not JSON", f"a Kiln function invoked through Lambda's API: {response}")
    with open(WAT_FILE, "rb") as f:
        wat = f.read()
    created = lam.create_function(FunctionName="lambda-wasm", Runtime="kiln-wasm", Role=ROLE, Handler="echo.wat",
                                  Code={"ZipFile": zipped("echo.wat", wat)})
    check(created["Runtime"] == "kiln-wasm", f"a kiln-wasm function: {created}")
    response = lam.invoke(FunctionName="lambda-wasm", Payload=b"echoed")
    check(response["Payload"].read() == b"echoed", "kiln-wasm invoked")


def slow_creations(lam):
    """A build longer than CreateFunction waits (its top level sleeps 11 s at deploy): Pending, then
    Active or Failed, as Lambda's clients expect."""
    slow = "import time\ntime.sleep(11)\n%s\ndef handler(event, context):\n    return {'slow': True}\n"
    created = lam.create_function(FunctionName="lambda-slow", Runtime="python3.12", Role=ROLE, Handler="slow.handler",
                                  Timeout=60, Code={"ZipFile": zipped("slow.py", slow % "")})
    check(created["State"] == "Pending" and created["StateReasonCode"] == "Creating"
          and created["LastUpdateStatus"] == "InProgress", f"a slow build answers Pending: {created}")
    check(lam.get_function(FunctionName="lambda-slow")["Configuration"]["State"] == "Pending", "GetFunction shows it Pending")
    try:
        lam.invoke(FunctionName="lambda-slow", Payload=b"{}")
        raise AssertionError("a pending function was invoked")
    except ClientError as e:
        check(e.response["Error"]["Code"] == "ResourceConflictException" and "Pending" in str(e), f"invoking it while pending: {e}")
    lam.get_waiter("function_active_v2").wait(FunctionName="lambda-slow", WaiterConfig={"Delay": 1, "MaxAttempts": 120})
    response, payload = invoke(lam, "lambda-slow", {})
    check(payload == {"slow": True}, f"invoked once active: {payload}")
    lam.delete_function(FunctionName="lambda-slow")

    lam.create_function(FunctionName="lambda-broken", Runtime="python3.12", Role=ROLE, Handler="slow.handler",
                        Timeout=60, Code={"ZipFile": zipped("slow.py", slow % "raise ValueError('broken at load')")})
    try:
        lam.get_waiter("function_active_v2").wait(FunctionName="lambda-broken", WaiterConfig={"Delay": 1, "MaxAttempts": 120})
        raise AssertionError("a function whose load raises became active")
    except WaiterError:
        pass
    failed = lam.get_function_configuration(FunctionName="lambda-broken")
    check(failed["State"] == "Failed" and "broken at load" in failed["StateReason"], f"a failed build shows Failed with its reason: {failed}")


def main():
    lam = client()
    both_apis(lam)
    slow_creations(lam)
    names = [language(lam, lang) for lang in LANGUAGES.split(",") if lang]
    # Listed a page at a time with Marker/NextMarker (boto3's paginator).
    listed = []
    for page in lam.get_paginator("list_functions").paginate(PaginationConfig={"PageSize": 1}):
        listed += [f["FunctionName"] for f in page["Functions"]]
    check(all(n in listed for n in names), f"listed: {listed}")
    if names:
        refusals(lam, names[0])
        aws_cli(names[0], os.environ.get("TMPDIR", "/tmp"))
    for name in names:
        lam.delete_function(FunctionName=name)
        try:
            lam.get_function(FunctionName=name)
            raise AssertionError(f"{name} outlived its deletion")
        except ClientError as e:
            check(e.response["Error"]["Code"] == "ResourceNotFoundException", f"deleted {name}: {e}")
    print("all lambda checks passed", flush=True)


main()
