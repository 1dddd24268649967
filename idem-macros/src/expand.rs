//! The code `#[idempotent]` generates.

use proc_macro2::{Delimiter, Group, Ident, Literal, Span, TokenStream, TokenTree};
use quote::{format_ident, quote, quote_spanned};
use syn::ext::IdentExt as _;
use syn::spanned::Spanned;

use crate::ast::{Handler, ItemFn};
use crate::attr::{self, Assignment, Change, DurationValue};
use crate::ctxt::Errors;
use crate::valid::{
    self, Checked, FingerprintPlan, KeyPlan, Plan, StatePlan, Strategy, VersionPlan,
};

/// The whole macro on `proc_macro2` types: parse → validate → expand. On any error the
/// function is emitted unchanged next to the errors, so the rest of the crate still type-checks.
pub fn idempotent(args: TokenStream, item: TokenStream) -> TokenStream {
    let mut errors = Errors::default();
    let options = attr::parse(args, &mut errors);
    let handler = match Handler::parse(item.clone()) {
        Ok(handler) => handler,
        Err(error) => {
            errors.push(error);
            let errors = errors.to_compile_errors();
            return quote!(#item #errors);
        }
    };
    let row_strategy = options
        .strategy
        .as_ref()
        .is_some_and(|strategy| matches!(strategy.value().as_str(), "state" | "version"));
    match valid::validate(options, &handler, &mut errors) {
        Some(Checked::Keyed(plan)) if errors.is_empty() => generate(&handler, &plan),
        Some(Checked::State(plan)) if errors.is_empty() => generate_state(&handler, &plan),
        Some(Checked::Version(plan)) if errors.is_empty() => generate_version(&handler, &plan),
        _ => {
            // The options that use the arguments are gone with the expansion: do not add
            // "unused variable" warnings to the errors.
            let errors = errors.to_compile_errors();
            if row_strategy {
                // A state or version handler's body returns `Ok(T)` under a signature promising
                // `Transitioned<T, _>` or `Versioned<T>`, which only the expansion reconciles: keep the signature
                // for the IDE, without the body, so the errors above are the only ones.
                let ItemFn {
                    outer, vis, sig, ..
                } = &handler.item;
                return quote! {
                    #(#outer)*
                    #[allow(unused_variables)]
                    #vis #sig {
                        ::core::panic!("`#[idempotent]` did not expand: see its errors")
                    }
                    #errors
                };
            }
            let item = &handler.item;
            quote!(#[allow(unused_variables)] #item #errors)
        }
    }
}

fn generate(handler: &Handler, plan: &Plan) -> TokenStream {
    let ItemFn {
        outer,
        inner,
        vis,
        sig,
        body: stmts,
        ..
    } = &handler.item;
    let krate = &plan.krate;
    let private = quote!(#krate::__private);
    let output = &plan.output;
    let local = |name: &str| format_ident!("__idem_{}", name, span = Span::mixed_site());
    let (store, key, fingerprint, body) = (
        local("store"),
        local("key"),
        local("fingerprint"),
        local("body"),
    );

    // The store argument of `run` is shown at the `store = …` expression: a value that is not a
    // store is reported there (and once more at the return type, where the call is).
    let store_expr = &plan.store;
    let store_stmt = quote_spanned!(store_expr.span()=> let #store = &(#store_expr););
    let store_arg = Ident::new(
        &store.to_string(),
        Span::mixed_site().located_at(store_expr.span()),
    );

    let scope = match &plan.scope {
        Some(scope) => quote!(#scope),
        None => {
            let name = sig.ident.unraw().to_string();
            quote!(#private::concat!(#private::module_path!(), "::", #name))
        }
    };
    let key_stmt = match &plan.key {
        KeyPlan::Field {
            base,
            members,
            span,
        } => {
            quote_spanned!(*span=> let #key = #private::record_key(#scope, &(#base #(.#members)*));)
        }
        KeyPlan::Expr(expr) => {
            let borrowed = borrow_parts(expr, &quote!(#private::key_part));
            quote_spanned!(expr.span()=> let #key = #private::record_key(#scope, &(#borrowed));)
        }
    };
    let fingerprint_stmt = match &plan.fingerprint {
        FingerprintPlan::Off => quote!(let #fingerprint = #private::no_fingerprint();),
        FingerprintPlan::Args(args, span) if args.len() == 1 => {
            quote_spanned!(*span=> let #fingerprint = #private::fingerprint(&(#(#args)*));)
        }
        FingerprintPlan::Args(args, span) => {
            quote_spanned!(*span=> let #fingerprint = #private::fingerprint(&(#(&#args,)*));)
        }
        FingerprintPlan::Expr(expr) => {
            let borrowed = borrow_parts(expr, &quote!(#private::payload_part));
            quote_spanned!(expr.span()=> let #fingerprint = #private::fingerprint(&(#borrowed));)
        }
    };

    let mut policy_expr = quote!(#krate::Policy::new());
    for (method, value) in [
        ("with_ttl", &plan.ttl),
        ("with_lease", &plan.lease),
        ("with_wait", &plan.wait),
    ] {
        let method = format_ident!("{}", method);
        match value {
            Some(DurationValue::Literal { lit, millis }) => {
                let millis = Literal::u64_suffixed(*millis);
                policy_expr.extend(
                    quote_spanned!(lit.span()=> .#method(#private::Duration::from_millis(#millis))),
                );
            }
            Some(DurationValue::Expr(expr)) => {
                policy_expr.extend(quote_spanned!(expr.span()=> .#method(#expr)));
            }
            None => {}
        }
    }
    if plan.heartbeat {
        policy_expr.extend(quote!(.with_heartbeat(true)));
    }
    if plan.fail_open {
        policy_expr.extend(quote!(.with_fail_open(true)));
    }

    // rustc reports a broken bound of `run` at the call and again at its `.await`: both are
    // shown at the return type (and `R` is inferred from it, not named), so the bounds on `T`
    // and `E` are reported once, at the type that breaks them. The span stays the macro's, so
    // lints such as `unused_qualifications` leave the generated path alone.
    let anchor = local("anchor");
    let at_output = Span::call_site().located_at(output.span());
    let path = respan(quote!(#private::run), at_output);
    let body_block = anchored_body(&anchor, &quote!(#output), stmts);
    let call = match (plan.strategy, &plan.tx) {
        (Strategy::Tx, Some(tx)) => {
            let (lease, span, policy) = (local("lease"), local("span"), local("policy"));
            let begin = respan(quote!(#private::tx_begin), at_output);
            let end = respan(quote!(#private::tx_end), at_output);
            // The transaction is passed as written: a `&mut` argument is reborrowed for each
            // call, and anything else is reported at the `tx = …` expression.
            let args = |rest: TokenStream| {
                let mut args = Group::new(Delimiter::Parenthesis, quote!(#store_arg, #tx, #rest));
                args.set_span(at_output);
                args
            };
            let begin_args = args(quote!(#key, #fingerprint, #policy));
            let end_args = args(quote!(#key, #lease, #policy, #body));
            let begin = quote_spanned!(at_output=> #begin #begin_args.await);
            let end = quote_spanned!(at_output=> #end #end_args.await);
            quote! {
                let #policy = #policy_expr;
                let #span = #private::tx_span(&#key);
                #private::Instrument::instrument(async {
                    let (#key, #lease) = match #begin {
                        #private::TxStep::Run(key, lease) => (key, lease),
                        #private::TxStep::Done(done) => return done,
                    };
                    let #body = #body_block.await;
                    #end
                }, #span).await
            }
        }
        _ => {
            let args = quote!(#store_arg, #key, #fingerprint, #policy_expr, #body);
            let mut args = Group::new(Delimiter::Parenthesis, args);
            args.set_span(at_output);
            let run = quote_spanned!(at_output=> #path #args.await);
            quote! {
                let #body = #body_block;
                #run
            }
        }
    };
    quote! {
        #(#outer)*
        #vis #sig {
            #(#inner)*
            #store_stmt
            #key_stmt
            #fingerprint_stmt
            #call
        }
    }
}

/// `strategy = "state"`: check the transition at compile time, move the row, run the body.
fn generate_state(handler: &Handler, plan: &StatePlan) -> TokenStream {
    let ItemFn {
        outer,
        inner,
        vis,
        sig,
        body: stmts,
        ..
    } = &handler.item;
    let StatePlan {
        krate,
        machine,
        from,
        to,
        table,
        id,
        column,
        id_column,
        tx,
        output,
    } = plan;
    let private = quote!(#krate::__private);
    let local = |name: &str| format_ident!("__idem_{}", name, span = Span::mixed_site());
    let (anchor, body, pending, guard, row) = (
        local("anchor"),
        local("body"),
        local("pending"),
        local("guard"),
        local("row"),
    );
    let (current, error) = (local("current"), local("error"));
    let at_output = Span::call_site().located_at(output.span());
    let undeclared = format!(
        "`{machine}` does not declare the transition `{from}` → `{to}`: add `{to}` to `#[state(to(…))]` on `{from}` if that move is legal, or name a declared transition",
        machine = quote!(#machine).to_string().replace(' ', ""),
        from = from.unraw(),
        to = to.unraw(),
    );
    let check = quote_spanned!(from.span().join(to.span()).unwrap_or_else(|| from.span())=>
        const _: () = ::core::assert!(#machine::__idem_declared(#machine::#from, #machine::#to), #undeclared);
    );
    let state_body = anchored_body(&anchor, &quote!(#private::StateBody<#output>), stmts);
    let begin = respan(quote!(#krate::state::transition_in), at_output);
    let end = respan(quote!(#private::state_end), at_output);
    quote! {
        #(#outer)*
        #vis #sig {
            #(#inner)*
            // A state that is not a variant is reported at its name; a transition the machine
            // does not declare fails this constant.
            #check
            let #row = &(#id);
            let #guard = #private::state_guard(#table, #id_column, #column);
            let #pending = match #begin(#tx, #guard, #row, #machine::#from, #machine::#to).await {
                ::core::result::Result::Ok(#private::Transitioned::Applied(#pending)) => #pending,
                ::core::result::Result::Ok(#private::Transitioned::Duplicate(#current)) => {
                    return ::core::result::Result::Ok(#private::Transitioned::Duplicate(#current));
                }
                ::core::result::Result::Err(#error) => {
                    return ::core::result::Result::Err(::core::convert::From::from(#error));
                }
            };
            let #body = #state_body.await;
            #end(#tx, #pending, #body).await
        }
    }
}

/// `strategy = "version"`: update the row at the expected version, then run the body.
fn generate_version(handler: &Handler, plan: &VersionPlan) -> TokenStream {
    let ItemFn {
        outer,
        inner,
        vis,
        sig,
        body: stmts,
        ..
    } = &handler.item;
    let VersionPlan {
        krate,
        table,
        id,
        id_column,
        version,
        version_column,
        set,
        conflict,
        tx,
        output,
    } = plan;
    let private = quote!(#krate::__private);
    let local = |name: &str| format_ident!("__idem_{}", name, span = Span::mixed_site());
    let (anchor, body, pending, update, row, expected, current, error) = (
        local("anchor"),
        local("body"),
        local("pending"),
        local("update"),
        local("row"),
        local("expected"),
        local("current"),
        local("error"),
    );
    let at_output = Span::call_site().located_at(output.span());
    let row_expr = match id {
        KeyPlan::Field {
            base,
            members,
            span,
        } => quote_spanned!(*span=> &(#base #(.#members)*)),
        KeyPlan::Expr(expr) => quote_spanned!(expr.span()=> &(#expr)),
    };
    let assignments = set.iter().map(
        |Assignment {
             column,
             change,
             value,
         }| {
            let method = match change {
                Change::Set => "set",
                Change::Add => "add",
                Change::Subtract => "subtract",
            };
            let method = Ident::new(method, Span::mixed_site().located_at(value.span()));
            let name = column.unraw().to_string();
            quote_spanned!(value.span()=> .#method(#name, &(#value)))
        },
    );
    let stale = if *conflict {
        quote!(#private::Stale::Conflict)
    } else {
        quote!(#private::Stale::Duplicate)
    };
    let version_body = anchored_body(&anchor, &quote!(#private::VersionBody<#output>), stmts);
    let begin = respan(quote!(#krate::version::update_in), at_output);
    let end = respan(quote!(#private::version_end), at_output);
    let expected_stmt = quote_spanned!(version.span()=>
        let #expected = #private::expected_version(&(#version));
    );
    quote! {
        #(#outer)*
        #vis #sig {
            #(#inner)*
            let #row = #row_expr;
            #expected_stmt
            let #update = #private::version_update(#table, #id_column, #version_column)
                #(#assignments)*;
            let #pending = match #begin(#tx, #update, #row, #expected, #stale).await {
                ::core::result::Result::Ok(#private::Versioned::Applied(#pending)) => #pending,
                ::core::result::Result::Ok(#private::Versioned::AlreadyApplied { current: #current }) => {
                    return ::core::result::Result::Ok(#private::Versioned::AlreadyApplied { current: #current });
                }
                ::core::result::Result::Err(#error) => {
                    return ::core::result::Result::Err(::core::convert::From::from(#error));
                }
            };
            let #body = #version_body.await;
            #end(#tx, #pending, #body).await
        }
    }
}

/// The body's statements in an `async` block whose type is pinned to `Result` type `output` by a
/// dead `return` of it first: a `?` or `Ok(..)` in the body is then checked against the
/// handler's types, with errors at the user's code. The statements go straight into the
/// block: wrapping the block itself would leave a one-expression body such as `{ Ok(x) }` as
/// a block in tail position, which `unused_braces` reports on the user's code.
fn anchored_body(anchor: &Ident, output: &TokenStream, stmts: &TokenStream) -> TokenStream {
    quote! {
        async {
            #[allow(
                unknown_lints,
                unreachable_code,
                clippy::diverging_sub_expression,
                clippy::empty_loop,
                clippy::let_unit_value,
                clippy::needless_return,
                clippy::unreachable
            )]
            if false {
                let #anchor: #output = loop {};
                return #anchor;
            }
            #stmts
        }
    }
}

/// The tokens with every span set to `span`.
fn respan(tokens: TokenStream, span: Span) -> TokenStream {
    tokens
        .into_iter()
        .map(|mut token| {
            if let TokenTree::Group(group) = &token {
                let mut inner = Group::new(group.delimiter(), respan(group.stream(), span));
                inner.set_span(span);
                token = TokenTree::Group(inner);
            } else {
                token.set_span(span);
            }
            token
        })
        .collect()
}

/// A composite key or fingerprint `(a, b)` as `(&(a), &(b))`, so its parts are borrowed, not
/// moved out of the message the body still uses (a tuple of references serializes, and so
/// fingerprints, exactly like the tuple of values). Other expressions are borrowed whole by
/// the caller.
///
/// Each part goes through `check` (a function returning its argument), whose bound is then
/// reported at the part that breaks it rather than at the whole tuple.
fn borrow_parts(expr: &syn::Expr, check: &TokenStream) -> TokenStream {
    match expr {
        syn::Expr::Tuple(tuple) => {
            let parts = tuple.elems.iter().map(|part| {
                let borrowed = borrow_parts(part, check);
                quote_spanned!(part.span()=> #check(&(#borrowed)))
            });
            quote_spanned!(tuple.paren_token.span.join()=> (#(#parts,)*))
        }
        syn::Expr::Paren(paren) => borrow_parts(&paren.expr, check),
        other => quote!(#other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expand(args: TokenStream, item: TokenStream) -> String {
        idempotent(args, item).to_string()
    }

    #[test]
    fn keeps_the_signature_and_wraps_the_body() {
        let out = expand(
            quote!(key = "order_no", store = store, ttl = "1h"),
            quote!(
                pub async fn pay(store: &S, msg: Msg) -> Result<u32, E> {
                    Ok(1)
                }
            ),
        );
        assert!(
            out.starts_with("pub async fn pay (store : & S , msg : Msg) -> Result < u32 , E >"),
            "{out}"
        );
        assert!(out.contains("record_key"), "{out}");
        assert!(out.contains("msg . order_no"), "{out}");
        assert!(out.contains("from_millis (3600000u64)"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
    }

    #[test]
    fn on_error_emits_the_function_unchanged_and_every_error() {
        let out = expand(
            quote!(tll = "1h", strategy = "magic"),
            quote!(
                fn pay(msg: Msg) -> () {}
            ),
        );
        assert!(
            out.starts_with("# [allow (unused_variables)] fn pay (msg : Msg) -> () { }"),
            "{out}"
        );
        for expected in [
            "unknown option `tll`",
            "must be `async fn`",
            "must return `Result<T, E>`",
            "unknown strategy `magic`",
            "missing option `key`",
            "missing option `store`",
        ] {
            assert!(out.contains(expected), "missing {expected:?} in {out}");
        }
    }

    #[test]
    fn fail_open_reaches_the_policy_and_only_for_claim() {
        let handler = quote!(
            async fn pay(store: &S, tx: &mut Tx, msg: Msg) -> Result<u32, E> {
                Ok(1)
            }
        );
        let out = expand(
            quote!(key = "order_no", store = store, fail_open = true),
            handler.clone(),
        );
        assert!(out.contains(". with_fail_open (true)"), "{out}");
        assert!(!out.contains("compile_error"), "{out}");
        let off = expand(
            quote!(key = "order_no", store = store, fail_open = false),
            handler.clone(),
        );
        assert!(!off.contains("with_fail_open"), "{off}");
        let tx = expand(
            quote!(
                key = "order_no",
                store = store,
                strategy = "tx",
                tx = tx,
                fail_open = true
            ),
            handler,
        );
        assert!(
            tx.contains("`fail_open` cannot be used with `strategy = \\\"tx\\\"`"),
            "{tx}"
        );
    }

    #[test]
    fn borrows_the_parts_of_a_composite_key() {
        let out = expand(
            quote!(key = (msg.tenant, (msg.order_no)), store = store),
            quote!(
                async fn pay(store: &S, msg: Msg) -> Result<u32, E> {
                    Ok(1)
                }
            ),
        );
        assert!(
            out.contains("key_part (& (msg . tenant))")
                && out.contains("key_part (& (msg . order_no))"),
            "{out}"
        );
    }

    #[test]
    fn version_binds_the_key_its_column_and_the_sibling_version() {
        let out = expand(
            quote!(
                key = "account.id",
                strategy = "version",
                table = "accounts",
                set(money -= msg.money, note = "debit"),
                tx = tx
            ),
            quote!(
                async fn debit(tx: &mut Tx, msg: Debit) -> Result<Versioned<u32>, E> {
                    Ok(1)
                }
            ),
        );
        assert!(!out.contains("compile_error"), "{out}");
        assert!(out.contains("& (msg . account . id)"), "{out}");
        assert!(
            out.contains("expected_version (& (msg . account . version))"),
            "{out}"
        );
        assert!(
            out.contains("version_update (\"accounts\" , \"id\" , \"version\")"),
            "{out}"
        );
        assert!(
            out.contains(". subtract (\"money\" , & (msg . money))"),
            "{out}"
        );
        assert!(out.contains(". set (\"note\" , & (\"debit\"))"), "{out}");
        assert!(out.contains("Stale :: Duplicate"), "{out}");
    }

    #[test]
    fn a_field_key_does_not_read_the_store_argument() {
        let out = expand(
            quote!(key = "order_no", store = &store),
            quote!(
                async fn pay(msg: Msg, store: &S) -> Result<u32, E> {
                    Ok(1)
                }
            ),
        );
        assert!(
            out.contains("`store`, is the store: name the message argument, e.g. `key = \\\"msg.order_no\\\"`"),
            "{out}"
        );
    }
}
