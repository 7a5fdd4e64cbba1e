"""The SDK's hello in Python, as a wasi:cli/command component (componentize-py).

Reads {"name": "..."} from stdin (the request body) and writes {"greeting": "Hello, ...!"} on
stdout (the response). A body without a name is an error: the message on stderr and a failed
exit, which Kiln reports as function_failed. Build: guests/polyglot/build.sh.
"""

import json
import sys

from wit_world import exports


class Run(exports.Run):
    def run(self) -> None:
        try:
            name = json.loads(sys.stdin.read() or "null")["name"]
        except (ValueError, TypeError, KeyError):
            name = None
        if not isinstance(name, str) or not name:
            print('hello: send {"name": "..."}', file=sys.stderr)
            sys.exit(1)
        sys.stdout.write(json.dumps({"greeting": f"Hello, {name}!"}, separators=(",", ":")))
        sys.stdout.flush()
