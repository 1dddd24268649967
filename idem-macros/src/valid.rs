//! Rules across the options and the function: what the expansion may rely on.

use proc_macro2::{Span, TokenStream, TokenTree};
use syn::ext::IdentExt as _;
use syn::spanned::Spanned;
use syn::{Expr, Ident, Index, LitStr, Member, ReturnType, Type};

use crate::ast::Handler;
use crate::attr::{Assignment, DurationValue, FingerprintValue, Key, Options};
use crate::ctxt::Errors;

/// How the handler is made idempotent.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Claim the key in the store, run the body, record the result.
    Claim,
    /// The claim, the body's writes and the result in the handler's own transaction.
    Tx,
    /// A guarded state transition of the row, in the handler's own transaction.
    State,
    /// An optimistic-lock update of the row, in the handler's own transaction.
    Version,
}

/// What the expansion generates: a keyed strategy (`claim`, `tx`) or a state transition.
pub enum Checked {
    Keyed(Box<Plan>),
    State(Box<StatePlan>),
    Version(Box<VersionPlan>),
}

/// A checked `strategy = "version"`.
pub struct VersionPlan {
    pub krate: syn::Path,
    pub table: LitStr,
    /// The row's id: the key.
    pub id: KeyPlan,
    pub id_column: LitStr,
    /// The version the message expects.
    pub version: Expr,
    pub version_column: LitStr,
    pub set: Vec<Assignment>,
    /// `stale = "conflict"`.
    pub conflict: bool,
    pub tx: Expr,
    pub output: Type,
}

/// A checked `strategy = "state"`.
pub struct StatePlan {
    pub krate: syn::Path,
    pub machine: syn::Path,
    pub from: Ident,
    pub to: Ident,
    pub table: LitStr,
    pub id: Expr,
    pub column: LitStr,
    pub id_column: LitStr,
    pub tx: Expr,
    pub output: Type,
}

/// What the expansion generates, all checked.
pub struct Plan {
    pub krate: syn::Path,
    pub store: Expr,
    pub key: KeyPlan,
    pub fingerprint: FingerprintPlan,
    pub scope: Option<LitStr>,
    pub ttl: Option<DurationValue>,
    pub lease: Option<DurationValue>,
    pub wait: Option<DurationValue>,
    pub heartbeat: bool,
    /// `fail_open = true` (`claim` only).
    pub fail_open: bool,
    pub output: Type,
    pub strategy: Strategy,
    /// The expression naming the transaction (`strategy = "tx"`).
    pub tx: Option<Expr>,
}

/// Where the business key comes from.
pub enum KeyPlan {
    /// `base.member.member…`, the members spanned at the option's string.
    Field {
        base: Ident,
        members: Vec<Member>,
        span: Span,
    },
    Expr(Expr),
}

/// What is fingerprinted.
pub enum FingerprintPlan {
    Off,
    /// These arguments, as one value (a tuple when several).
    Args(Vec<Ident>, Span),
    Expr(Expr),
}

/// Checks the options against each other and against the function; records every problem.
pub fn validate(options: Options, handler: &Handler, errors: &mut Errors) -> Option<Checked> {
    let sig = &handler.item.sig;
    if sig.asyncness.is_none() {
        errors.spanned(
            sig.fn_token.span,
            "`#[idempotent]` handlers must be `async fn`: add `async` before `fn`",
        );
    }
    let output = output_type(&sig.output, sig.paren_token.span.close(), errors);
    let strategy = check_strategy(&options, errors);
    if strategy == Some(Strategy::Version) {
        return version_plan(options, handler, output, errors)
            .map(|plan| Checked::Version(Box::new(plan)));
    }
    for (given, name) in version_options_given(&options) {
        errors.spanned(
            given,
            format_args!("`{name}` belongs to `strategy = \"version\"` (an optimistic-lock update of a row); leave it out, or add `strategy = \"version\"`"),
        );
    }
    if strategy == Some(Strategy::State) {
        return state_plan(options, output, errors).map(|plan| Checked::State(Box::new(plan)));
    }
    for (given, name) in state_options_given(&options) {
        if name == "id_column" || name == "table" {
            errors.spanned(
                given,
                format_args!("`{name}` belongs to `strategy = \"state\"` or `\"version\"` (a guarded update of a row); leave it out, or add the strategy"),
            );
            continue;
        }
        errors.spanned(
            given,
            format_args!("`{name}` belongs to `strategy = \"state\"` (a guarded transition of a row's state); leave it out, or add `strategy = \"state\"`"),
        );
    }

    if options.key.is_none() {
        errors.spanned(
            Span::call_site(),
            "missing option `key`: say which business key makes two deliveries the same, e.g. \
             `key = \"order_no\"` (a field of the last argument) or `key = (msg.tenant, msg.order_no)`",
        );
    }
    if options.store.is_none() {
        errors.spanned(
            Span::call_site(),
            "missing option `store`: give the store that records the keys, e.g. `store = store` \
             (an argument of type `&MemoryStore`) or `store = &self.store`",
        );
    }
    let key = options
        .key
        .and_then(|key| key_plan(key, handler, options.store.as_ref(), errors));
    let fingerprint = match (options.fingerprint, &key) {
        (Some(FingerprintValue::Expr(expr)), _) => FingerprintPlan::Expr(expr),
        (Some(FingerprintValue::Switch(switch)), _) if !switch.value => FingerprintPlan::Off,
        (_, Some(key)) => default_fingerprint(key, handler),
        (_, None) => FingerprintPlan::Off,
    };

    Some(Checked::Keyed(Box::new(Plan {
        krate: options
            .krate
            .unwrap_or_else(|| syn::parse_quote!(::idem_runtime)),
        store: options.store?,
        key: key?,
        fingerprint,
        scope: options.scope,
        ttl: options.ttl,
        lease: options.lease,
        wait: options.wait,
        heartbeat: options.heartbeat.is_some_and(|switch| switch.value),
        fail_open: options.fail_open.is_some_and(|switch| switch.value),
        output: output?,
        tx: match strategy? {
            Strategy::Tx => Some(options.tx?),
            Strategy::Claim | Strategy::State | Strategy::Version => None,
        },
        strategy: strategy?,
    })))
}

/// The spans and names of the `state` options given.
fn state_options_given(options: &Options) -> Vec<(Span, &'static str)> {
    let mut given = Vec::new();
    let mut add = |span: Option<Span>, name: &'static str| {
        if let Some(span) = span {
            given.push((span, name));
        }
    };
    add(options.machine.as_ref().map(Spanned::span), "machine");
    add(options.from.as_ref().map(Ident::span), "from");
    add(options.to.as_ref().map(Ident::span), "to");
    add(options.table.as_ref().map(LitStr::span), "table");
    add(options.id.as_ref().map(Spanned::span), "id");
    add(options.column.as_ref().map(LitStr::span), "column");
    add(options.id_column.as_ref().map(LitStr::span), "id_column");
    given
}

/// The spans and names of the keyed options given.
fn keyed_options_given(options: &Options) -> Vec<(Span, &'static str)> {
    let mut given = Vec::new();
    let mut add = |span: Option<Span>, name: &'static str| {
        if let Some(span) = span {
            given.push((span, name));
        }
    };
    add(
        options.key.as_ref().map(|key| match key {
            Key::Field(lit) => lit.span(),
            Key::Expr(expr) => expr.span(),
        }),
        "key",
    );
    add(options.store.as_ref().map(Spanned::span), "store");
    add(options.scope.as_ref().map(LitStr::span), "scope");
    add(options.ttl.as_ref().map(duration_span), "ttl");
    add(options.lease.as_ref().map(duration_span), "lease");
    add(
        options
            .fingerprint
            .as_ref()
            .map(|fingerprint| match fingerprint {
                FingerprintValue::Switch(switch) => switch.span(),
                FingerprintValue::Expr(expr) => expr.span(),
            }),
        "fingerprint",
    );
    add(options.wait.as_ref().map(duration_span), "wait");
    add(
        options.heartbeat.as_ref().map(|switch| switch.span()),
        "heartbeat",
    );
    given
}

/// Checks `strategy = "state"`: the machine, the transition, the row and the transaction.
fn state_plan(options: Options, output: Option<Type>, errors: &mut Errors) -> Option<StatePlan> {
    for (given, name) in keyed_options_given(&options) {
        errors.spanned(
            given,
            format_args!("`{name}` means nothing with `strategy = \"state\"`: the row's state is the record of what was done; leave `{name}` out"),
        );
    }
    let mut required = |missing: bool, message: &str| {
        if missing {
            errors.spanned(Span::call_site(), message);
        }
    };
    required(
        options.machine.is_none(),
        "missing option `machine`: name the enum that derives `StateMachine`, e.g. `machine = OrderStatus`",
    );
    required(
        options.from.is_none() || options.to.is_none(),
        "`strategy = \"state\"` needs the transition: `from = Created, to = Paid` (states of the `machine`)",
    );
    required(
        options.table.is_none(),
        "missing option `table`: the table of the rows whose state moves, e.g. `table = \"orders\"`",
    );
    required(
        options.id.is_none(),
        "missing option `id`: which row moves, e.g. `id = msg.order_id` (matched against `id_column`, default `id`)",
    );
    required(
        options.tx.is_none(),
        "`strategy = \"state\"` moves the row in your database transaction: name the argument that holds it, e.g. `tx = tx` for an argument `tx: &mut sqlx::Transaction<'_, Postgres>`",
    );
    if let (Some(from), Some(to)) = (&options.from, &options.to)
        && from == to
    {
        errors.spanned(
            to.span(),
            format_args!("`from = {from}, to = {to}` goes nowhere: a row already at `{to}` would look like a redelivery and a new message alike; a guarded transition needs two states"),
        );
    }
    let default = |name: &str| LitStr::new(name, Span::call_site());
    Some(StatePlan {
        krate: options
            .krate
            .unwrap_or_else(|| syn::parse_quote!(::idem_runtime)),
        machine: options.machine?,
        from: options.from?,
        to: options.to?,
        table: options.table?,
        id: options.id?,
        column: options.column.unwrap_or_else(|| default("status")),
        id_column: options.id_column.unwrap_or_else(|| default("id")),
        tx: options.tx?,
        output: output?,
    })
}

/// The spans and names of the `version` options given.
fn version_options_given(options: &Options) -> Vec<(Span, &'static str)> {
    let mut given = Vec::new();
    let mut add = |span: Option<Span>, name: &'static str| {
        if let Some(span) = span {
            given.push((span, name));
        }
    };
    add(options.version.as_ref().map(Spanned::span), "version");
    add(
        options.version_column.as_ref().map(LitStr::span),
        "version_column",
    );
    add(options.set.as_ref().map(|set| set.span), "set");
    add(options.stale.as_ref().map(LitStr::span), "stale");
    given
}

/// Checks `strategy = "version"`: the row, its version, the assignments and the transaction.
fn version_plan(
    options: Options,
    handler: &Handler,
    output: Option<Type>,
    errors: &mut Errors,
) -> Option<VersionPlan> {
    for (given, name) in keyed_options_given(&options) {
        if name == "key" {
            continue;
        }
        errors.spanned(
            given,
            format_args!("`{name}` means nothing with `strategy = \"version\"`: the row's version is the record of what was done; leave `{name}` out"),
        );
    }
    for (given, name) in state_options_given(&options) {
        let hint = match name {
            "table" | "id_column" => continue,
            "id" => {
                "with `strategy = \"version\"`, `key = …` selects the row (matched against `id_column`)"
            }
            "column" => "the version column is `version_column`",
            _ => "it belongs to `strategy = \"state\"`",
        };
        errors.spanned(
            given,
            format_args!(
                "`{name}` means nothing with `strategy = \"version\"`: {hint}; leave `{name}` out"
            ),
        );
    }
    let mut required = |missing: bool, message: &str| {
        if missing {
            errors.spanned(Span::call_site(), message);
        }
    };
    required(
        options.key.is_none(),
        "missing option `key`: which row the update is for, e.g. `key = \"account_id\"` (a field of the last argument, matched against the column of the same name, or `id_column`)",
    );
    required(
        options.table.is_none(),
        "missing option `table`: the table of the versioned rows, e.g. `table = \"accounts\"`",
    );
    required(
        options.set.is_none(),
        "missing option `set`: what the update writes, e.g. `set(money -= msg.amount)` or `set(status = \"paid\")`; idem adds `version = version + 1`",
    );
    required(
        options.tx.is_none(),
        "`strategy = \"version\"` updates the row in your database transaction: name the argument that holds it, e.g. `tx = tx` for an argument `tx: &mut sqlx::Transaction<'_, Postgres>`",
    );
    let key = options
        .key
        .and_then(|key| key_plan(key, handler, None, errors));
    let default = |name: &str| LitStr::new(name, Span::call_site());
    // A field key names its column; the message that carries it carries the version.
    let (id_column, version) = match &key {
        Some(KeyPlan::Field {
            base,
            members,
            span,
        }) => {
            let column = match members.last() {
                Some(Member::Named(field)) => Some(LitStr::new(&field.unraw().to_string(), *span)),
                Some(Member::Unnamed(_)) => None,
                None => Some(LitStr::new(&base.unraw().to_string(), *span)),
            };
            let version = match members.split_last() {
                Some((_, path)) => {
                    let field = Ident::new("version", Span::mixed_site().located_at(*span));
                    let expr: Expr = syn::parse_quote_spanned!(*span=> #base #(.#path)* .#field);
                    Some(expr)
                }
                None => None,
            };
            (column, version)
        }
        Some(KeyPlan::Expr(_)) | None => (None, None),
    };
    let id_column = options.id_column.or(id_column);
    if id_column.is_none() && key.is_some() {
        errors.spanned(
            Span::call_site(),
            "missing option `id_column`: the key is an expression, so name the column it is matched against, e.g. `id_column = \"id\"`",
        );
    }
    let version = options.version.or(version);
    if version.is_none() && key.is_some() {
        errors.spanned(
            Span::call_site(),
            "missing option `version`: the version the message expects the row at, e.g. `version = msg.version`",
        );
    }
    let version_column = options.version_column.unwrap_or_else(|| default("version"));
    if let Some(set) = &options.set {
        for assignment in &set.list {
            if assignment.column.unraw() == version_column.value() {
                errors.spanned(
                    assignment.column.span(),
                    format_args!("`{}` is the version column: idem writes `{0} = {0} + 1` itself; leave it out of `set(…)`", version_column.value()),
                );
            }
        }
    }
    Some(VersionPlan {
        krate: options
            .krate
            .unwrap_or_else(|| syn::parse_quote!(::idem_runtime)),
        table: options.table?,
        id: key?,
        id_column: id_column?,
        version: version?,
        version_column,
        set: options.set?.list,
        conflict: options
            .stale
            .is_some_and(|stale| stale.value() == "conflict"),
        tx: options.tx?,
        output: output?,
    })
}

fn output_type(output: &ReturnType, close: Span, errors: &mut Errors) -> Option<Type> {
    const HINT: &str = "`T` is stored and replayed, and `E` must implement \
                        `From<idem_runtime::Error>`";
    let ty = match output {
        ReturnType::Default => {
            errors.spanned(
                close,
                format_args!("an `#[idempotent]` handler must return `Result<T, E>`: add `-> Result<T, E>`; {HINT}"),
            );
            return None;
        }
        ReturnType::Type(_, ty) => ty,
    };
    let mut inner = &**ty;
    while let Type::Paren(syn::TypeParen { elem, .. }) | Type::Group(syn::TypeGroup { elem, .. }) =
        inner
    {
        inner = elem;
    }
    if let Type::Path(_) = inner {
        return Some((**ty).clone());
    }
    errors.spanned(
        ty.span(),
        format_args!(
            "an `#[idempotent]` handler must return `Result<T, E>`, not this type; {HINT}"
        ),
    );
    None
}

/// The strategy, and the options that only one strategy takes.
fn check_strategy(options: &Options, errors: &mut Errors) -> Option<Strategy> {
    let strategy = match &options.strategy {
        None => Strategy::Claim,
        Some(lit) => match lit.value().as_str() {
            "claim" => Strategy::Claim,
            "tx" => Strategy::Tx,
            "state" => Strategy::State,
            "version" => Strategy::Version,
            name => {
                errors.spanned(
                    lit.span(),
                    format_args!("unknown strategy `{name}`; the strategies are `claim` (the default), `tx`, `state` and `version`: write one of them or leave the option out"),
                );
                return None;
            }
        },
    };
    if let Some(fail_open) = &options.fail_open {
        let why = match strategy {
            Strategy::Claim => None,
            Strategy::Tx => Some((
                "tx",
                "the claim and the body's writes commit in one transaction",
            )),
            Strategy::State => Some((
                "state",
                "the row's transition and the body's writes commit in one transaction",
            )),
            Strategy::Version => Some((
                "version",
                "the row's versioned update and the body's writes commit in one transaction",
            )),
        };
        if let Some((name, commit_together)) = why {
            errors.spanned(
                fail_open.span(),
                format_args!("`fail_open` cannot be used with `strategy = \"{name}\"`: {commit_together}, so when the database cannot be reached the body cannot run either, and there is nothing to fail open to; leave `fail_open` out (the store error is returned: do not ack, redeliver later)"),
            );
        }
    }
    match strategy {
        Strategy::Claim => {
            if let Some(tx) = &options.tx {
                errors.spanned(
                    tx.span(),
                    "`tx` means nothing with the `claim` strategy: to write the record in this transaction, add `strategy = \"tx\"`; otherwise leave `tx` out",
                );
            }
        }
        Strategy::State | Strategy::Version => {
            if let Some(tx) = options.tx.as_ref().filter(|tx| !is_place(tx)) {
                errors.spanned(
                    tx.span(),
                    "`tx` must name the transaction: an argument such as `tx = tx`, a field such as `tx = self.tx`, or `tx = &mut tx`; it is used before and after the body, so it cannot be a call",
                );
            }
        }
        Strategy::Tx => {
            if options.tx.is_none() {
                let span = options
                    .strategy
                    .as_ref()
                    .map_or_else(Span::call_site, LitStr::span);
                errors.spanned(
                    span,
                    "strategy `tx` runs the handler in your database transaction: name the argument that holds it, e.g. `tx = tx` for an argument `tx: &mut sqlx::Transaction<'_, Postgres>`",
                );
            }
            if let Some(tx) = options.tx.as_ref().filter(|tx| !is_place(tx)) {
                errors.spanned(
                    tx.span(),
                    "`tx` must name the transaction: an argument such as `tx = tx`, a field such as `tx = self.tx`, or `tx = &mut tx`; it is used before and after the body, so it cannot be a call",
                );
            }
            if let Some(wait) = &options.wait {
                errors.spanned(
                    duration_span(wait),
                    "`wait` means nothing with `strategy = \"tx\"`: a duplicate already waits on the record's row lock until the first transaction ends; leave `wait` out",
                );
            }
            if let Some(heartbeat) = &options.heartbeat {
                errors.spanned(
                    heartbeat.span(),
                    "`heartbeat` means nothing with `strategy = \"tx\"`: the transaction holds the key until it ends; leave `heartbeat` out",
                );
            }
        }
    }
    Some(strategy)
}

/// Whether `expr` names a place (`tx`, `self.tx`, `&mut tx`) rather than computing a value.
fn is_place(expr: &Expr) -> bool {
    match expr {
        Expr::Path(path) => path.qself.is_none() && path.path.get_ident().is_some(),
        Expr::Field(field) => is_place(&field.base),
        Expr::Paren(paren) => is_place(&paren.expr),
        Expr::Reference(reference) => reference.mutability.is_some() && is_place(&reference.expr),
        _ => false,
    }
}

fn duration_span(value: &DurationValue) -> Span {
    match value {
        DurationValue::Literal { lit, .. } => lit.span(),
        DurationValue::Expr(expr) => expr.span(),
    }
}

fn key_plan(
    key: Key,
    handler: &Handler,
    store: Option<&Expr>,
    errors: &mut Errors,
) -> Option<KeyPlan> {
    let lit = match key {
        Key::Expr(expr) => return Some(KeyPlan::Expr(expr)),
        Key::Field(lit) => lit,
    };
    let span = lit.span();
    let text = lit.value();
    if text.trim().is_empty() {
        errors.spanned(
            span,
            "`key` is empty: name the field that holds the business key, e.g. `key = \"order_no\"`",
        );
        return None;
    }
    // The fields are shown at the string but marked as generated: for a misspelt field rustc
    // then does not offer to replace the whole string by the field's name, which would turn
    // `key = "order_np"` into the expression `key = order_no`.
    let member_span = Span::mixed_site().located_at(span);
    let mut segments = Vec::new();
    for segment in text.split('.') {
        if let Ok(index) = segment.parse::<u32>() {
            segments.push(Member::Unnamed(Index {
                index,
                span: member_span,
            }));
        } else if let Ok(ident) = syn::parse_str::<Ident>(segment) {
            segments.push(Member::Named(respanned(&ident, member_span)));
        } else {
            errors.spanned(
                span,
                format_args!("`key = {text:?}` is not a field path: `{segment}` is not a field name; write fields separated by dots, e.g. `key = \"order.no\"`, or give an expression, e.g. `key = format!(…)`"),
            );
            return None;
        }
    }
    // `"msg.order_no"` or `"order_no"` naming an argument: read from that argument.
    if let Some(Member::Named(first)) = segments.first() {
        let named_arg = handler.arg(&first.to_string()).cloned().or_else(|| {
            (handler.has_receiver && first == "self").then(|| Ident::new("self", span))
        });
        if let Some(base) = named_arg {
            let base = respanned(&base, span);
            return Some(KeyPlan::Field {
                base,
                members: segments.split_off(1),
                span,
            });
        }
    }
    // Otherwise a field of the last argument: the message.
    match handler.args.last() {
        Some(arg) => match &arg.name {
            Some(name) if is_named(store, name) => {
                let message = handler
                    .args
                    .iter()
                    .rev()
                    .filter_map(|arg| arg.name.as_ref())
                    .find(|other| !is_named(store, other));
                let fix = match message {
                    Some(message) => format!(
                        "name the message argument, e.g. `key = \"{message}.{text}\"`, or put it last"
                    ),
                    None => "add the message argument, e.g. `msg: OrderPaid`, after the store"
                        .to_owned(),
                };
                errors.spanned(
                    span,
                    format_args!("`key = {text:?}` reads a field of the last argument, but the last argument, `{name}`, is the store: {fix}"),
                );
                None
            }
            Some(name) => Some(KeyPlan::Field {
                base: respanned(name, span),
                members: segments,
                span,
            }),
            None => {
                errors.spanned(
                    arg.span,
                    format_args!("`key = {text:?}` reads a field of the last argument, which needs a plain name such as `msg: OrderPaid`; or give an expression, e.g. `key = order_no`"),
                );
                None
            }
        },
        None => {
            errors.spanned(
                span,
                format_args!("`key = {text:?}` names a field of the message argument, but this function takes no argument; add the message argument or give an expression"),
            );
            None
        }
    }
}

/// Whether the `store = …` option is the argument `name` (`store`, `&store`, `&*store`).
fn is_named(store: Option<&Expr>, name: &Ident) -> bool {
    match store {
        Some(Expr::Path(path)) => path.qself.is_none() && path.path.is_ident(name),
        Some(Expr::Reference(syn::ExprReference { expr, .. }))
        | Some(Expr::Paren(syn::ExprParen { expr, .. }))
        | Some(Expr::Unary(syn::ExprUnary {
            op: syn::UnOp::Deref(_),
            expr,
            ..
        })) => is_named(Some(expr), name),
        _ => false,
    }
}

/// By default the fingerprint covers the argument(s) the key is read from.
fn default_fingerprint(key: &KeyPlan, handler: &Handler) -> FingerprintPlan {
    match key {
        KeyPlan::Field { base, span, .. } if base != "self" => {
            FingerprintPlan::Args(vec![respanned(base, *span)], *span)
        }
        KeyPlan::Field { .. } => FingerprintPlan::Off,
        KeyPlan::Expr(expr) => {
            let mut used = Vec::new();
            mentioned(&quote::ToTokens::to_token_stream(expr), &mut used);
            let args: Vec<Ident> = handler
                .args
                .iter()
                .filter_map(|arg| arg.name.as_ref())
                .filter(|name| used.iter().any(|ident| ident == *name))
                .map(|name| respanned(name, expr.span()))
                .collect();
            if args.is_empty() {
                FingerprintPlan::Off
            } else {
                FingerprintPlan::Args(args, expr.span())
            }
        }
    }
}

/// The identifiers an expression mentions as variables (not as fields after a `.`).
fn mentioned(tokens: &TokenStream, out: &mut Vec<Ident>) {
    let mut after_dot = false;
    for token in tokens.clone() {
        let dot = matches!(&token, TokenTree::Punct(punct) if punct.as_char() == '.');
        match token {
            TokenTree::Ident(ident) if !after_dot => out.push(ident),
            TokenTree::Group(group) => mentioned(&group.stream(), out),
            _ => {}
        }
        after_dot = dot;
    }
}

/// `ident` shown at `span`. Cloning keeps a raw identifier (`r#type`) raw, which
/// `Ident::new(&ident.to_string(), …)` would reject with a panic.
fn respanned(ident: &Ident, span: Span) -> Ident {
    let mut ident = ident.clone();
    ident.set_span(span);
    ident
}
