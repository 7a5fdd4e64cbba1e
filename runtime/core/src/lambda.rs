//! Lambda's handler conventions on Kiln's functions from source: `file.function(event, context)`
//! in Python, `export const handler = async (event, context) => …` in JavaScript,
//! `def handler(event:, context:)` in Ruby. A function whose config carries a [`LambdaHandler`]
//! gets a small entry file generated at deploy ([`write_entry`]) that imports the user's file,
//! builds the `context` and calls their function; the language runtime sees an ordinary Kiln
//! handler.
//!
//! The Lambda API (`kiln-server`'s `lambda`) sends the event wrapped with its context,
//! `{"__kiln_lambda__": {context}, "event": event}`, and gets back
//! `{"__kiln_lambda__": {"result": value}}` or `{"__kiln_lambda__": {"error": {"errorMessage",
//! "errorType", "stackTrace"}}}`, Lambda's error payload. Invoked through Kiln's own API the
//! same function takes the plain event and answers the plain result (an exception is then
//! Kiln's `function_failed`), with a context made from the function's config.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::function::Runtime;

/// The key of the wrapped event and result.
pub const WRAPPER: &str = "__kiln_lambda__";

/// How Lambda names the handler and runtime of a function: kept in its config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LambdaHandler {
    /// Lambda's runtime identifier (`python3.12`, `nodejs22.x`, `ruby3.4`…), as created.
    #[schema(example = "python3.12")]
    pub runtime: String,
    /// Lambda's handler string: `file.function` (Python may use `package.module.function`, Ruby
    /// `file.Module::Class.method`).
    #[schema(example = "lambda_function.lambda_handler")]
    pub handler: String,
    /// The execution role, kept and shown (Kiln grants through connectors, not roles).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
}

/// The Lambda runtime identifiers Kiln runs, and the language each is built on.
pub const RUNTIMES: [(&str, Runtime); 6] = [
    ("python3.12", Runtime::Python),
    ("python3.13", Runtime::Python),
    ("nodejs20.x", Runtime::Javascript),
    ("nodejs22.x", Runtime::Javascript),
    ("ruby3.3", Runtime::Ruby),
    ("ruby3.4", Runtime::Ruby),
];

/// The language a Lambda runtime identifier runs on; the error names the ones Kiln has.
pub fn language(runtime: &str) -> Result<Runtime, String> {
    RUNTIMES
        .iter()
        .find(|(name, _)| *name == runtime)
        .map(|(_, language)| *language)
        .ok_or_else(|| {
            let known: Vec<&str> = RUNTIMES.iter().map(|(name, _)| *name).collect();
            format!(
                "runtime {runtime:?} is not supported by Kiln (supported: {}; a .wasm module deploys through Kiln's own API)",
                known.join(", ")
            )
        })
}

impl LambdaHandler {
    /// Checks the handler string's shape for its language (the file is checked at deploy).
    pub fn check(&self) -> Result<Runtime, String> {
        let language = language(&self.runtime)?;
        let target = parse(language, &self.handler)?;
        crate::tier::wasm::source::check_path(&target.file).map_err(|e| format!("handler: {e}"))?;
        if self.role.as_ref().is_some_and(|r| r.len() > 2048) {
            return Err("role is longer than 2048 characters".into());
        }
        if self.description.as_ref().is_some_and(|d| d.len() > 256) {
            return Err("description is longer than 256 characters".into());
        }
        Ok(language)
    }
}

/// A handler string taken apart: the file (without its extension for JavaScript, which may be
/// `.mjs` or `.js`) and what to call in it.
#[derive(Debug, PartialEq, Eq)]
struct Target {
    file: String,
    call: String,
}

fn identifier(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_' || c == '$')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$')
}

fn parse(language: Runtime, handler: &str) -> Result<Target, String> {
    let bad = |why: &str| {
        Err(format!(
            "handler {handler:?} is not {why} (Lambda's form: {})",
            match language {
                Runtime::Python => "file.function, or package.module.function",
                Runtime::Javascript => "file.export",
                Runtime::Ruby => "file.method, or file.Module::Class.method",
            }
        ))
    };
    if handler.len() > 128 {
        return bad("at most 128 characters");
    }
    // The file part ends at the first dot after the last slash.
    let slash = handler.rfind('/').map_or(0, |i| i + 1);
    let Some(dot) = handler[slash..].find('.').map(|i| slash + i) else {
        return bad("a file and a name");
    };
    let (file, call) = (&handler[..dot], &handler[dot + 1..]);
    match language {
        Runtime::Python => {
            // `package.module.function`: the function is after the last dot.
            let (module, function) = handler.rsplit_once('.').expect("has a dot");
            let parts: Vec<&str> = module.split(['.', '/']).collect();
            if !identifier(function) || function.contains('$') || parts.iter().any(|p| !identifier(p)) {
                return bad("a Python module and function");
            }
            Ok(Target {
                file: format!("{}.py", parts.join("/")),
                call: format!("{}:{function}", parts.join(".")),
            })
        }
        Runtime::Javascript => {
            if !call.split('.').all(identifier) || file.split('/').any(|p| p.is_empty() || p == "..") {
                return bad("a module file and an export");
            }
            Ok(Target {
                file: file.to_owned(),
                call: call.to_owned(),
            })
        }
        Runtime::Ruby => {
            let (receiver, method) = match call.rsplit_once('.') {
                Some((receiver, method)) => (Some(receiver), method),
                None => (None, call),
            };
            let constant = |c: &str| {
                c.split("::")
                    .all(|p| identifier(p) && p.starts_with(|c: char| c.is_ascii_uppercase()))
            };
            let method_ok = identifier(method.trim_end_matches(['?', '!'])) && !method.contains('$');
            if !method_ok
                || receiver.is_some_and(|r| !constant(r))
                || file.split('/').any(|p| p.is_empty() || p == "..")
            {
                return bad("a Ruby file and method");
            }
            Ok(Target {
                file: format!("{file}.rb"),
                call: call.to_owned(),
            })
        }
    }
}

/// Where a single-file upload goes for `lambda`: the file its handler names (`.mjs` for
/// JavaScript).
pub fn single_file(lambda: &LambdaHandler) -> Result<String, String> {
    let language = lambda.check()?;
    let target = parse(language, &lambda.handler)?;
    Ok(match language {
        Runtime::Javascript => format!("{}.mjs", target.file),
        Runtime::Python | Runtime::Ruby => target.file,
    })
}

/// What the generated entry file embeds: the context fields known at deploy.
pub struct Defaults<'a> {
    pub function_name: &'a str,
    pub memory_mb: u64,
    pub timeout_ms: u64,
    /// The config's environment: JavaScript handlers read it as Node's `process.env`.
    pub env: &'a std::collections::BTreeMap<String, String>,
}

/// An ARN-shaped name Kiln gives a function (Lambda clients expect one): the same for the same
/// function and version, on every node.
pub fn arn(function: &str, qualifier: Option<&str>) -> String {
    match qualifier {
        Some(q) => format!("arn:aws:lambda:kiln:000000000000:function:{function}:{q}"),
        None => format!("arn:aws:lambda:kiln:000000000000:function:{function}"),
    }
}

/// Writes the entry file for `lambda` into the unpacked upload at `app` and returns its path
/// relative to `app`. Refuses a handler whose file the upload does not have.
pub fn write_entry(app: &Path, lambda: &LambdaHandler, defaults: &Defaults<'_>) -> Result<String, String> {
    let language = lambda.check()?;
    let target = parse(language, &lambda.handler)?;
    let missing = |file: &str| {
        format!(
            "the handler {:?} names {file}, which the upload does not have",
            lambda.handler
        )
    };
    let context = serde_json::json!({
        "function_name": defaults.function_name,
        "function_version": "$LATEST",
        "memory_limit_in_mb": defaults.memory_mb,
        "invoked_function_arn": arn(defaults.function_name, None),
        "log_group_name": format!("/aws/lambda/{}", defaults.function_name),
        "log_stream_name": "kiln",
        "timeout_ms": defaults.timeout_ms,
    })
    .to_string();
    let (name, source) = match language {
        Runtime::Python => {
            let package = target.file.trim_end_matches(".py").to_owned() + "/__init__.py";
            if !app.join(&target.file).is_file() && !app.join(&package).is_file() {
                return Err(missing(&target.file));
            }
            let (module, function) = target.call.split_once(':').expect("module:function");
            ("__kiln_lambda__.py", python(module, function, &context))
        }
        Runtime::Javascript => {
            let file = ["mjs", "js"]
                .iter()
                .map(|ext| format!("{}.{ext}", target.file))
                .find(|file| app.join(file).is_file())
                .ok_or_else(|| missing(&format!("{}.mjs or {}.js", target.file, target.file)))?;
            // Node's `process.env`, set by a module imported before the user's (imports run in order).
            let env = format!(
                "// Generated by Kiln: Node's process.env for Lambda handlers.\n\
                 globalThis.process ??= {{}};\nglobalThis.process.env = {};\n",
                serde_json::to_string(defaults.env).expect("env serialises")
            );
            std::fs::write(app.join("__kiln_env__.mjs"), env)
                .map_err(|e| format!("writing the Lambda entry file: {e}"))?;
            ("__kiln_lambda__.mjs", javascript(&file, &target.call, &context))
        }
        Runtime::Ruby => {
            if !app.join(&target.file).is_file() {
                return Err(missing(&target.file));
            }
            ("__kiln_lambda__.rb", ruby(&target.file, &target.call, &context))
        }
    };
    std::fs::write(app.join(name), source).map_err(|e| format!("writing the Lambda entry file: {e}"))?;
    Ok(name.to_owned())
}

fn json_string(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

fn python(module: &str, function: &str, context: &str) -> String {
    format!(
        r#"# Generated by Kiln: Lambda's handler convention (see runtime/core/src/lambda.rs).
import importlib, json, sys, time, traceback, uuid
_entry = sys.modules.pop("main", None)  # this file; the user's may be called main.py too
try:
    _fn = getattr(importlib.import_module({module}), {function})
finally:
    if _entry is not None:
        sys.modules["main"] = _entry
_DEFAULTS = json.loads({context})

class LambdaContext:
    def __init__(self, c):
        self.aws_request_id = c["request_id"]
        self.function_name = c["function_name"]
        self.function_version = c["function_version"]
        self.memory_limit_in_mb = str(c["memory_limit_in_mb"])
        self.invoked_function_arn = c["invoked_function_arn"]
        self.log_group_name = c["log_group_name"]
        self.log_stream_name = c["log_stream_name"]
        self.identity = None
        self.client_context = c.get("client_context")
        self._deadline_ms = c["deadline_ms"]

    def get_remaining_time_in_millis(self):
        return max(0, int(self._deadline_ms - time.time() * 1000))

def handler(payload):
    if not (isinstance(payload, dict) and {wrapper} in payload):
        c = dict(_DEFAULTS, request_id=str(uuid.uuid4()), deadline_ms=time.time() * 1000 + _DEFAULTS["timeout_ms"])
        return _fn(payload, LambdaContext(c))
    c = payload[{wrapper}]
    try:
        return {{{wrapper}: {{"result": _fn(payload.get("event"), LambdaContext(c))}}}}
    except Exception as e:
        traceback.print_exc()
        return {{{wrapper}: {{"error": {{
            "errorMessage": str(e),
            "errorType": type(e).__name__,
            "requestId": c["request_id"],
            "stackTrace": traceback.format_tb(e.__traceback__),
        }}}}}}
"#,
        module = json_string(module),
        function = json_string(function),
        context = json_string(context),
        wrapper = json_string(WRAPPER),
    )
}

fn javascript(file: &str, export: &str, context: &str) -> String {
    let path: Vec<String> = export.split('.').map(json_string).collect();
    format!(
        r#"// Generated by Kiln: Lambda's handler convention (see runtime/core/src/lambda.rs).
import "./__kiln_env__.mjs";
import * as user from {file};
const fn = [{path}].reduce((o, k) => (o == null ? undefined : o[k]), user);
if (typeof fn !== "function") {{
  throw new Error("the handler " + {handler} + " is not an exported function");
}}
const DEFAULTS = {context};
const WRAPPER = {wrapper};

function context(c) {{
  return {{
    awsRequestId: c.request_id,
    functionName: c.function_name,
    functionVersion: c.function_version,
    memoryLimitInMB: String(c.memory_limit_in_mb),
    invokedFunctionArn: c.invoked_function_arn,
    logGroupName: c.log_group_name,
    logStreamName: c.log_stream_name,
    clientContext: c.client_context,
    callbackWaitsForEmptyEventLoop: true,
    getRemainingTimeInMillis: () => Math.max(0, Math.floor(c.deadline_ms - Date.now())),
  }};
}}

function requestId() {{
  const hex = [];
  for (let i = 0; i < 32; i++) hex.push(Math.floor(Math.random() * 16).toString(16));
  const s = hex.join("");
  return [s.slice(0, 8), s.slice(8, 12), s.slice(12, 16), s.slice(16, 20), s.slice(20)].join("-");
}}

export default async function handler(payload) {{
  if (!(payload !== null && typeof payload === "object" && WRAPPER in payload)) {{
    const c = {{ ...DEFAULTS, request_id: requestId(), deadline_ms: Date.now() + DEFAULTS.timeout_ms }};
    return await fn(payload, context(c));
  }}
  const c = payload[WRAPPER];
  try {{
    const result = await fn(payload.event === undefined ? null : payload.event, context(c));
    return {{ [WRAPPER]: {{ result: result === undefined ? null : result }} }};
  }} catch (e) {{
    const error = e instanceof Error ? e : new Error(String(e));
    console.error(String(error.stack || error));
    return {{
      [WRAPPER]: {{
        error: {{
          errorType: error.name || "Error",
          errorMessage: error.message,
          trace: String(error.stack || "").split("\n").filter((l) => l.length > 0),
        }},
      }},
    }};
  }}
}}
"#,
        file = json_string(&format!("./{file}")),
        path = path.join(", "),
        handler = json_string(export),
        context = context,
        wrapper = json_string(WRAPPER),
    )
}

fn ruby(file: &str, call: &str, context: &str) -> String {
    let (receiver, method) = match call.rsplit_once('.') {
        Some((receiver, method)) => (Some(receiver), method),
        None => (None, call),
    };
    let target = match receiver {
        Some(constant) => format!("Object.const_get({}).method(:{method})", json_string(constant)),
        None => format!("TOPLEVEL_BINDING.receiver.method(:{method})"),
    };
    format!(
        r##"# Generated by Kiln: Lambda's handler convention (see runtime/core/src/lambda.rs).
require "json"
require "securerandom"
require_relative {file}

module KilnLambda
  WRAPPER = {wrapper}
  DEFAULTS = JSON.parse({context})
  # Taken before this file defines `handler`, which the user's file may define too.
  TARGET = {target}

  class Context
    attr_reader :aws_request_id, :function_name, :function_version, :memory_limit_in_mb,
                :invoked_function_arn, :log_group_name, :log_stream_name, :client_context

    def initialize(c)
      @aws_request_id = c["request_id"]
      @function_name = c["function_name"]
      @function_version = c["function_version"]
      @memory_limit_in_mb = c["memory_limit_in_mb"].to_s
      @invoked_function_arn = c["invoked_function_arn"]
      @log_group_name = c["log_group_name"]
      @log_stream_name = c["log_stream_name"]
      @client_context = c["client_context"]
      @deadline_ms = c["deadline_ms"]
    end

    def get_remaining_time_in_millis
      [(@deadline_ms - Time.now.to_f * 1000).to_i, 0].max
    end
  end
end

def handler(payload)
  unless payload.is_a?(Hash) && payload.key?(KilnLambda::WRAPPER)
    c = KilnLambda::DEFAULTS.merge("request_id" => SecureRandom.uuid,
                                   "deadline_ms" => Time.now.to_f * 1000 + KilnLambda::DEFAULTS["timeout_ms"])
    return KilnLambda::TARGET.call(event: payload, context: KilnLambda::Context.new(c))
  end
  c = payload[KilnLambda::WRAPPER]
  begin
    {{ KilnLambda::WRAPPER => {{ "result" => KilnLambda::TARGET.call(event: payload["event"], context: KilnLambda::Context.new(c)) }} }}
  rescue StandardError => e
    $stderr.puts "#{{e.class}}: #{{e.message}}", e.backtrace
    {{ KilnLambda::WRAPPER => {{ "error" => {{
      "errorMessage" => e.message, "errorType" => e.class.name, "stackTrace" => e.backtrace || []
    }} }} }}
  end
end
"##,
        file = json_string(&format!("./{}", file.trim_end_matches(".rb"))),
        wrapper = json_string(WRAPPER),
        context = json_string(context),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handler_strings_name_a_file_and_what_to_call() {
        let t = |language, handler| parse(language, handler);
        assert_eq!(
            t(Runtime::Python, "lambda_function.lambda_handler").unwrap(),
            Target {
                file: "lambda_function.py".into(),
                call: "lambda_function:lambda_handler".into()
            }
        );
        assert_eq!(
            t(Runtime::Python, "app/handlers.main.run").unwrap(),
            Target {
                file: "app/handlers/main.py".into(),
                call: "app.handlers.main:run".into()
            }
        );
        assert_eq!(
            t(Runtime::Javascript, "src/index.handler").unwrap(),
            Target {
                file: "src/index".into(),
                call: "handler".into()
            }
        );
        assert_eq!(
            t(Runtime::Ruby, "function.Billing::Handler.process").unwrap(),
            Target {
                file: "function.rb".into(),
                call: "Billing::Handler.process".into()
            }
        );
        for (language, bad) in [
            (Runtime::Python, "nodot"),
            (Runtime::Python, "a.b-c"),
            (Runtime::Python, "../x.f"),
            (Runtime::Javascript, "index."),
            (Runtime::Javascript, "../index.handler"),
            (Runtime::Ruby, "f.lower::Case.m"),
            (Runtime::Ruby, "f.m; system('x')"),
        ] {
            assert!(t(language, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn runtimes_map_onto_languages() {
        assert_eq!(language("python3.13").unwrap(), Runtime::Python);
        assert_eq!(language("nodejs22.x").unwrap(), Runtime::Javascript);
        assert_eq!(language("ruby3.3").unwrap(), Runtime::Ruby);
        let err = language("java21").unwrap_err();
        assert!(err.contains("java21") && err.contains("python3.12"), "{err}");
    }

    #[test]
    fn the_entry_file_needs_the_handlers_file() {
        let app = tempfile::tempdir().unwrap();
        let lambda = LambdaHandler {
            runtime: "nodejs20.x".into(),
            handler: "index.handler".into(),
            role: None,
            description: None,
        };
        let env = std::collections::BTreeMap::from([("GREETING".to_owned(), "hi".to_owned())]);
        let defaults = Defaults {
            function_name: "f",
            memory_mb: 128,
            timeout_ms: 3000,
            env: &env,
        };
        let err = write_entry(app.path(), &lambda, &defaults).unwrap_err();
        assert!(err.contains("index.mjs or index.js"), "{err}");
        std::fs::write(app.path().join("index.js"), "export const handler = async () => 1;").unwrap();
        let entry = write_entry(app.path(), &lambda, &defaults).unwrap();
        let text = std::fs::read_to_string(app.path().join(&entry)).unwrap();
        assert!(text.contains(r#"import * as user from "./index.js";"#), "{text}");
        let env = std::fs::read_to_string(app.path().join("__kiln_env__.mjs")).unwrap();
        assert!(env.contains(r#"{"GREETING":"hi"}"#), "{env}");
    }
}
