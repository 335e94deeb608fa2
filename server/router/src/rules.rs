//! The explicit rules, tried before the classifier: patterns whose meaning is unambiguous, so
//! a query that matches one never pays for an embedding. First match wins, in this order: a
//! message that is only greetings or thanks → chat; a tool cue (URL, arithmetic, a request to
//! calculate with numbers, the current time or date, a unit conversion) → agent; an explicit
//! reference to the tenant's documents → RAG, only when the tenant has documents.
//!
//! Rules are deliberately narrow (a miss costs nothing: the classifier decides); the benchmark
//! prints how often each fires on the labelled set and how often it is wrong.

use std::sync::OnceLock;

use regex::Regex;

use crate::{By, Context, Decision, Mode};

struct Rule {
    mode: Mode,
    /// What the reason string says.
    name: &'static str,
    re: Regex,
}

/// Physical units and currencies a conversion names (lower case).
const UNITS: &str = r"(?:km|kms|kilomet(?:er|re)s?|mi|miles?|m|met(?:er|re)s?|cm|centimet(?:er|re)s?|mm|millimet(?:er|re)s?|in|inch(?:es)?|ft|feet|foot|yards?|yd|kg|kilos?|kilograms?|g|grams?|lbs?|pounds?|oz|ounces?|stones?|l|lit(?:er|re)s?|ml|millilit(?:er|re)s?|gallons?|gal|quarts?|pints?|cups?|tablespoons?|tbsp|teaspoons?|tsp|°?c|°?f|celsius|fahrenheit|kelvin|mph|km/h|kph|knots?|acres?|hectares?|usd|eur|gbp|jpy|chf|dollars?|euros?|yen|bytes?|kb|mb|gb|tb|kib|mib|gib|hours?|minutes?|seconds?|days?|weeks?)";

/// Greetings and thanks that make up a whole message.
const GREETING: &str = r"(?:hi|hello|hey|hiya|yo|howdy|greetings|good (?:morning|afternoon|evening|night)|thanks|thank you|thanks a lot|many thanks|thx|cheers|bye|goodbye|see you(?: later)?|how are you(?: doing)?(?: today)?|how's it going|what's up|nice to meet you|you're welcome|ok|okay|great|cool|awesome)(?: (?:there|again|so much|everyone|all|friend|buddy|bot|assistant))?";

fn rules() -> &'static [Rule] {
    static RULES: OnceLock<Vec<Rule>> = OnceLock::new();
    RULES.get_or_init(|| {
        let rule = |mode, name, re: &str| Rule {
            mode,
            name,
            re: Regex::new(re).unwrap_or_else(|e| panic!("router rule {name}: {e}")),
        };
        let docs = r"(?:docs?|documentation|documents?|knowledge ?base|kb|handbook|wiki|polic(?:y|ies)|manuals?|guides?|guidelines|runbooks?|playbooks?|files?|notes|faq|specs?|specifications?|contracts?|sops?|intranet|confluence|notion)";
        vec![
            rule(
                Mode::Chat,
                "the message is only a greeting or thanks",
                &format!(r"^\s*{GREETING}(?:[\s,!.?:;)(-]+{GREETING})*[\s,!.?:;)(-]*$"),
            ),
            rule(Mode::Agent, "the query contains a URL (http_get)", r"(?:https?://|\bwww\.)\S+"),
            rule(
                Mode::Agent,
                "the query contains an arithmetic expression (calculator)",
                // Minus and division only with spaces: "2024-05-01", "10-20 guests", "24/7", "1/2 cup".
                r"(?:\d|\))\s*[+*×÷^]\s*\(?\s*-?\d|\d\s+[-/]\s+\(?\s*-?\d",
            ),
            rule(
                Mode::Agent,
                "the query is an arithmetic question (calculator)",
                r"^(?:what(?:'s| is)|calculate|compute|evaluate|solve)\s+[-\d(][\d\s.,()+\-*/×÷^]*\d\s*[?.!]?\s*$",
            ),
            rule(
                Mode::Agent,
                "the query names an arithmetic operation on numbers (calculator)",
                r"\d\s*(?:plus|minus|times|multiplied by|divided by|over|to the power of|squared|cubed)\b|\b(?:square root|cube root|sqrt|factorial|logarithm|log|natural log)\s*(?:of\s*)?\(?\s*\d|\d(?:\.\d+)?\s*(?:%|percent)\s+(?:of|off)\s+\S*\d",
            ),
            rule(
                Mode::Agent,
                "the query asks to calculate with numbers (calculator)",
                r"\b(?:calculate|compute|evaluate)\b.*\d|\d.*\b(?:calculate|compute)\b",
            ),
            rule(
                Mode::Agent,
                "the query asks for the current time or date (current_time)",
                r"\bwhat time is it\b|\bwhat(?:'s| is) the (?:current |local |exact )?time(?: now| right now| here| there| in [a-z ]+)?\s*[?.!]?\s*$|\bwhat(?:'s| is) the (?:current |local )?time in\b|\bcurrent (?:time|date)\b|\btoday'?s date\b|\bwhat(?:'s| is) (?:the )?(?:date|day) today\b|\bwhat (?:day|date) is (?:it|today)\b|\btime (?:is it )?(?:right )?now\b",
            ),
            rule(
                Mode::Agent,
                "the query asks for a unit conversion (calculator)",
                &format!(
                    r"\bconvert\s+[-\d.,]+\s*(?:{UNITS}|[$€£])|[-\d.,]+\s*{UNITS}\s+(?:to|in|into)\s+{UNITS}\b|\bhow many\s+{UNITS}\s+(?:are |is )?(?:in|is)\s+(?:a |an |one |[-\d.,]+\s*){UNITS}\b"
                ),
            ),
            rule(
                Mode::Rag,
                "the query refers to the tenant's documents",
                &format!(
                    r"\baccording to (?:the|our|my|this|these|company|internal)\b[^?.!]{{0,40}}?\b{docs}\b|\b(?:in|from|based on|using|search|check|consult|look (?:it )?up in|per|see) (?:the|our|my) (?:internal |company |team |uploaded )?{docs}\b|\b(?:our|the) knowledge ?base\b"
                ),
            ),
        ]
    })
}

/// The first rule `query` matches (lower-cased, typographic apostrophes made plain), if any.
/// With `ctx.has_documents` false the RAG rule is skipped.
pub fn apply(query: &str, ctx: &Context) -> Option<Decision> {
    let q = query.trim().to_lowercase().replace(['\u{2019}', '\u{2018}'], "'");
    if q.is_empty() {
        return Some(Decision {
            mode: Mode::Chat,
            confidence: 1.0,
            reason: "rule: the query is empty".into(),
            by: By::Rule,
        });
    }
    rules()
        .iter()
        .filter(|r| ctx.allows(r.mode))
        .find(|r| r.re.is_match(&q))
        .map(|r| Decision {
            mode: r.mode,
            confidence: 1.0,
            reason: format!("rule: {}", r.name),
            by: By::Rule,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCS: Context = Context { has_documents: true };
    const NO_DOCS: Context = Context { has_documents: false };

    fn mode(q: &str) -> Option<Mode> {
        apply(q, &DOCS).map(|d| d.mode)
    }

    #[test]
    fn tool_cues_go_to_the_agent() {
        for q in [
            "What is 17 * 23?",
            "whats 3+4",
            "what is 100 - 37?",
            "What's 144/12",
            "(12 + 8) * 3",
            "Calculate the compound interest on $5,000 at 4% for 3 years",
            "what is 15% of 80",
            "square root of 1764",
            "12 divided by 5",
            "What time is it?",
            "what's the time in Tokyo",
            "What is today's date?",
            "What day is it today?",
            "Fetch https://example.com/status and summarise it",
            "what's on www.rust-lang.org today",
            "Convert 5 miles to km",
            "how many ounces are in 3 cups",
            "72 °F in celsius",
        ] {
            assert_eq!(mode(q), Some(Mode::Agent), "{q}");
        }
    }

    #[test]
    fn document_references_go_to_rag_only_with_documents() {
        for q in [
            "According to our handbook, how many vacation days do I get?",
            "according to the docs, how do I rotate an API key",
            "What does our knowledge base say about refunds?",
            "Search our wiki for the on-call rota",
            "based on the uploaded documents, who owns the billing service?",
        ] {
            assert_eq!(mode(q), Some(Mode::Rag), "{q}");
            assert_ne!(apply(q, &NO_DOCS).map(|d| d.mode), Some(Mode::Rag), "{q}");
        }
    }

    #[test]
    fn greetings_alone_are_chat() {
        for q in [
            "hi",
            "Hello there!",
            "thanks, bye",
            "Good morning :)",
            "hey, how are you?",
            "Thank you so much!",
        ] {
            let d = apply(q, &DOCS).unwrap();
            assert_eq!((d.mode, d.by, d.confidence), (Mode::Chat, By::Rule, 1.0), "{q}");
            assert!(d.reason.starts_with("rule: "), "{}", d.reason);
        }
        assert_eq!(mode(""), Some(Mode::Chat));
    }

    #[test]
    fn look_alikes_are_left_to_the_classifier() {
        for q in [
            "hi, can you write me a haiku about autumn?",
            "What is the time complexity of quicksort?",
            "Explain how to calculate a standard deviation",
            "Summarise the meeting of 2024-05-01",
            "We expect 10-20 guests; plan a menu",
            "Convert this paragraph to the passive voice",
            "Who wrote the documentation for Python?",
            "What is the capital of Australia?",
            "thanks for the help, now tell me a joke",
        ] {
            assert_eq!(mode(q), None, "{q}");
        }
    }
}
