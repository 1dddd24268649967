//! The handler as the macro sees it: the function as written and its arguments by name.

use proc_macro2::{Span, TokenStream};
use quote::{ToTokens, TokenStreamExt as _};
use syn::parse::{Parse, ParseStream};
use syn::spanned::Spanned;
use syn::{Attribute, FnArg, Ident, Item, Pat, Signature, Visibility, braced, token};

/// A function as written: its attributes, visibility and signature parsed, its body kept as
/// tokens. A half-typed body (`let x = ;`, the normal state while typing) then gets rustc's own
/// error at the user's code, not "this is not a function" (tracing-attributes' `MaybeItemFn`).
pub struct ItemFn {
    /// `#[…]` before the function.
    pub outer: Vec<Attribute>,
    /// `#![…]` at the top of its body.
    pub inner: Vec<Attribute>,
    pub vis: Visibility,
    pub sig: Signature,
    brace: token::Brace,
    /// The body after its inner attributes, unparsed.
    pub body: TokenStream,
}

impl Parse for ItemFn {
    fn parse(input: ParseStream<'_>) -> syn::Result<Self> {
        let outer = input.call(Attribute::parse_outer)?;
        let vis = input.parse()?;
        let sig = input.parse()?;
        let content;
        let brace = braced!(content in input);
        let inner = content.call(Attribute::parse_inner)?;
        let body = content.parse()?;
        Ok(Self {
            outer,
            inner,
            vis,
            sig,
            brace,
            body,
        })
    }
}

impl ToTokens for ItemFn {
    fn to_tokens(&self, tokens: &mut TokenStream) {
        tokens.append_all(&self.outer);
        self.vis.to_tokens(tokens);
        self.sig.to_tokens(tokens);
        self.brace.surround(tokens, |tokens| {
            tokens.append_all(&self.inner);
            self.body.to_tokens(tokens);
        });
    }
}

/// An annotated function, kept as written.
pub struct Handler {
    pub item: ItemFn,
    /// The arguments after the receiver, by name (`None` for a destructuring pattern).
    pub args: Vec<Arg>,
    /// Whether the function takes `self`.
    pub has_receiver: bool,
}

/// One argument of the handler.
pub struct Arg {
    pub name: Option<Ident>,
    pub span: Span,
}

/// The error for an item that is not a function with a body, at the token that shows it.
fn not_a_function(item: TokenStream) -> syn::Error {
    let declaration = syn::parse2::<syn::TraitItemFn>(item.clone())
        .ok()
        .and_then(|item| item.semi_token)
        .or_else(|| {
            syn::parse2::<syn::ForeignItemFn>(item.clone())
                .ok()
                .map(|item| item.semi_token)
        });
    if let Some(semi) = declaration {
        return syn::Error::new(
            semi.span,
            "`#[idempotent]` needs a function with a body: put it on the method in the `impl` \
             block, not on the trait's declaration",
        );
    }
    let (kind, span) = match syn::parse2::<Item>(item) {
        Ok(Item::Struct(item)) => ("a struct", item.struct_token.span),
        Ok(Item::Enum(item)) => ("an enum", item.enum_token.span),
        Ok(Item::Union(item)) => ("a union", item.union_token.span),
        Ok(Item::Trait(item)) => ("a trait", item.trait_token.span),
        Ok(Item::Impl(item)) => ("an `impl` block", item.impl_token.span),
        Ok(Item::Mod(item)) => ("a module", item.mod_token.span),
        Ok(Item::Const(item)) => ("a const", item.const_token.span),
        Ok(Item::Static(item)) => ("a static", item.static_token.span),
        Ok(Item::Type(item)) => ("a type alias", item.type_token.span),
        Ok(Item::Use(item)) => ("a `use`", item.use_token.span),
        _ => ("this item", Span::call_site()),
    };
    syn::Error::new(
        span,
        format_args!(
            "`#[idempotent]` applies to an `async fn` handler, not to {kind}: put it on the \
             `async fn` that handles the message"
        ),
    )
}

impl Handler {
    /// Parses the annotated item; anything but a function with a body is an error.
    pub fn parse(item: TokenStream) -> syn::Result<Self> {
        let item: ItemFn = syn::parse2(item.clone()).map_err(|_| not_a_function(item))?;
        let mut has_receiver = false;
        let mut args = Vec::new();
        for input in &item.sig.inputs {
            match input {
                FnArg::Receiver(_) => has_receiver = true,
                FnArg::Typed(typed) => args.push(Arg {
                    name: match &*typed.pat {
                        Pat::Ident(pat) if pat.subpat.is_none() => Some(pat.ident.clone()),
                        _ => None,
                    },
                    span: typed.pat.span(),
                }),
            }
        }
        Ok(Self {
            item,
            args,
            has_receiver,
        })
    }

    /// The argument called `name`, if there is one.
    pub fn arg(&self, name: &str) -> Option<&Ident> {
        self.args
            .iter()
            .filter_map(|arg| arg.name.as_ref())
            .find(|ident| *ident == name)
    }
}
