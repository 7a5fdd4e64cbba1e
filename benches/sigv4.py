"""Signs one Lambda API request with AWS Signature Version 4 (Python's standard library only) and
prints shell assignments `aws_authorization=…` and `aws_date=…` for benches/run.sh.

Usage: sigv4.py KEY_JSON METHOD HOST PATH BODY   (KEY_JSON: the answer of POST /v1/tokens {"kind":"aws"})
"""
import datetime
import hashlib
import hmac
import json
import shlex
import sys

key, method, host, path, body = sys.argv[1:6]
key = json.loads(key)
now = datetime.datetime.now(datetime.timezone.utc)
amz_date, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
payload_hash = hashlib.sha256(body.encode()).hexdigest()
canonical = "\n".join([method, path, "", f"host:{host}", f"x-amz-date:{amz_date}", "", "host;x-amz-date", payload_hash])
scope = f"{day}/us-east-1/lambda/aws4_request"
to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
signing_key = ("AWS4" + key["secret_access_key"]).encode()
for part in (day, "us-east-1", "lambda", "aws4_request"):
    signing_key = hmac.new(signing_key, part.encode(), hashlib.sha256).digest()
signature = hmac.new(signing_key, to_sign.encode(), hashlib.sha256).hexdigest()
authorization = (f"AWS4-HMAC-SHA256 Credential={key['access_key_id']}/{scope}, "
                 f"SignedHeaders=host;x-amz-date, Signature={signature}")
print(f"aws_authorization={shlex.quote(authorization)}")
print(f"aws_date={shlex.quote(amz_date)}")
