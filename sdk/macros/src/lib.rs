//! The attribute macros of [`kiln-sdk`](https://docs.rs/kiln-sdk): `#[function]`, `#[init]` and
//! `#[restore]`. Use them through `kiln_sdk`, whose documentation describes them; this crate only
//! turns them into code.
//!
//! Each macro needs nothing but the name of the function it is on, so it reads that name from the
//! token stream itself rather than pulling in a full Rust parser: the SDK stays quick to build.
//! It leaves the function as written and adds a small wrapper that calls into
//! `kiln_sdk::__private`, where the real work (and the type checking of the signature) happens.

use proc_macro::{Delimiter, TokenStream, TokenTree};

/// Makes the function the entry point of a Kiln function: JSON in over stdin, JSON out over
/// stdout. See `kiln_sdk::function`.
#[proc_macro_attribute]
pub fn function(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(attr, item, "function", |name| {
        format!("fn main() -> ::std::process::ExitCode {{ ::kiln_sdk::__private::run_function({name}) }}")
    })
}

/// Exports the function as the init hook (`wizer.initialize`) that Kiln runs once at deploy and
/// snapshots. See `kiln_sdk::init`.
#[proc_macro_attribute]
pub fn init(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(attr, item, "init", |name| {
        format!(
            r#"
            // Modules (wasm32-wasip1): Kiln runs this export once at deploy and snapshots the result.
            #[cfg(not(all(target_os = "wasi", target_env = "p2")))]
            const _: () = {{
                // SAFETY: `wizer.initialize` is the init-hook name Kiln and Wizer look for; a
                // second definition in the same program fails to link instead of misbehaving.
                #[unsafe(export_name = "wizer.initialize")]
                extern "C" fn __kiln_sdk_init() {{ ::kiln_sdk::__private::run_init({name}) }}
            }};
            // Components (wasm32-wasip2) have no snapshot: the hook runs as a constructor when each
            // instance starts, before the function, so the state it builds is there all the same.
            #[cfg(all(target_os = "wasi", target_env = "p2"))]
            const _: () = {{
                extern "C" fn __kiln_sdk_init() {{ ::kiln_sdk::__private::run_init({name}) }}
                // SAFETY: `.init_array` is the linker's list of constructors, each a pointer to an
                // `extern "C" fn()`, which this static is.
                #[used]
                #[unsafe(link_section = ".init_array")]
                static __KILN_SDK_INIT: extern "C" fn() = __kiln_sdk_init;
            }};
            "#
        )
    })
}

/// Exports the function as the restore hook (`kiln.restore`) that Kiln runs on every fresh
/// instance of a snapshot. See `kiln_sdk::restore`.
#[proc_macro_attribute]
pub fn restore(attr: TokenStream, item: TokenStream) -> TokenStream {
    expand(attr, item, "restore", |name| {
        format!(
            r#"
            // Components are never restored from a snapshot, so only modules export the hook.
            #[cfg(not(all(target_os = "wasi", target_env = "p2")))]
            const _: () = {{
                // SAFETY: `kiln.restore` is the restore-hook name Kiln looks for; a second
                // definition in the same program fails to link instead of misbehaving.
                #[unsafe(export_name = "kiln.restore")]
                extern "C" fn __kiln_sdk_restore() {{ ::kiln_sdk::__private::run_restore({name}) }}
            }};
            // Referenced all the same, so a hook that never runs is not reported as dead code.
            #[cfg(all(target_os = "wasi", target_env = "p2"))]
            const _: fn() = {name};
            "#
        )
    })
}

/// The function unchanged, followed by the wrapper `generate` writes for its name; or a
/// `compile_error!` saying what is wrong.
fn expand(attr: TokenStream, item: TokenStream, macro_name: &str, generate: impl Fn(&str) -> String) -> TokenStream {
    if !attr.is_empty() {
        return error(&format!("#[kiln_sdk::{macro_name}] takes no arguments"));
    }
    let name = match function_name(&item) {
        Ok(name) => name,
        Err(why) => return error(&format!("#[kiln_sdk::{macro_name}] {why}")),
    };
    if macro_name == "function" && name == "main" {
        return error("#[kiln_sdk::function] writes `main` itself: give the handler another name, e.g. `handle`");
    }
    let wrapper: TokenStream = match generate(&name).parse() {
        Ok(tokens) => tokens,
        Err(e) => return error(&format!("kiln-sdk-macros generated invalid code: {e}")),
    };
    let mut out = item;
    out.extend(wrapper);
    out
}

/// The name of the `fn` item: the identifier after the top-level `fn` keyword.
fn function_name(item: &TokenStream) -> Result<String, &'static str> {
    let mut tokens = item.clone().into_iter();
    while let Some(token) = tokens.next() {
        match token {
            TokenTree::Ident(ident) if ident.to_string() == "async" => {
                return Err("goes on a plain `fn`; async functions are not supported");
            }
            TokenTree::Ident(ident) if ident.to_string() == "fn" => {
                return match tokens.next() {
                    Some(TokenTree::Ident(name)) => Ok(name.to_string()),
                    _ => Err("expects a function name after `fn`"),
                };
            }
            // Attributes and the body are groups; a `fn` inside them is not ours.
            TokenTree::Group(group) if group.delimiter() == Delimiter::Brace => break,
            _ => {}
        }
    }
    Err("goes on a function (`fn name(...)`)")
}

fn error(message: &str) -> TokenStream {
    format!("::core::compile_error!({message:?});").parse().unwrap()
}
