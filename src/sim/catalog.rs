//! The workflows the simulator publishes, and their `market/info` view.
//!
//! The catalog is static data: each entry exercises a different part of a
//! client (plain run, external-cost consent and media inputs, guaranteed
//! failure that is still billed).

use rust_decimal::Decimal;
use serde_json::{Value, json};

/// The type of an input parameter or output, as named in the manifests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ValueType {
    String,
    Int,
    Float,
    Bool,
    Image,
    Video,
    Audio,
}

impl ValueType {
    /// The manifest spelling.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Int => "int",
            Self::Float => "float",
            Self::Bool => "bool",
            Self::Image => "image",
            Self::Video => "video",
            Self::Audio => "audio",
        }
    }

    /// File extension used for simulated output URLs.
    pub(crate) fn extension(self) -> &'static str {
        match self {
            Self::Image => "png",
            Self::Video => "mp4",
            Self::Audio => "wav",
            _ => "txt",
        }
    }
}

/// A parameter default. Kept as a small enum so the catalog can be `static`.
#[derive(Debug, Clone, Copy)]
pub(crate) enum DefaultValue {
    Str(&'static str),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl DefaultValue {
    fn to_json(self) -> Value {
        match self {
            Self::Str(s) => json!(s),
            Self::Int(i) => json!(i),
            Self::Float(f) => json!(f),
            Self::Bool(b) => json!(b),
        }
    }
}

/// One entry of `editable_parameter_manifest`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Param {
    pub key: &'static str,
    pub display_name: &'static str,
    pub ty: ValueType,
    pub required: bool,
    pub default: Option<DefaultValue>,
}

/// One entry of `candidate_output_manifest`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    pub key: &'static str,
    pub ty: ValueType,
}

/// How a run of this workflow ends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Outcome {
    /// Succeeds; the final amount is a key-derived fraction of the quote.
    Succeeds,
    /// Always fails, but the compute already spent is still charged.
    Fails {
        error_code: &'static str,
        error_message: &'static str,
        /// Charged amount in units of 1e-8 CNY.
        charged_units: i64,
    },
}

/// A published workflow.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Workflow {
    pub workflow_id: &'static str,
    pub revision_id: &'static str,
    pub title: &'static str,
    pub description: &'static str,
    pub tags: &'static [&'static str],
    /// Quote in units of 1e-8 CNY, so it is exact and the catalog stays `static`.
    pub quote_units: i64,
    pub may_incur_external_model_cost: bool,
    pub external_cost_notice: &'static str,
    /// Seedance workflows also take `inputs.contains_real_person_material`
    /// (a bool that is not in the manifest), per the submit page.
    pub accepts_real_person_flag: bool,
    pub params: &'static [Param],
    pub outputs: &'static [Output],
    pub outcome: Outcome,
}

impl Workflow {
    /// The frozen quote, exactly.
    pub(crate) fn quote(&self) -> Decimal {
        Decimal::new(self.quote_units, 8)
    }

    /// The input parameter called `key`, if the manifest has one.
    pub(crate) fn param(&self, key: &str) -> Option<&'static Param> {
        self.params.iter().find(|p| p.key == key)
    }

    /// The `data` of a `market/info` answer.
    pub(crate) fn market_info(&self) -> Value {
        let params: Vec<Value> = self
            .params
            .iter()
            .map(|p| {
                json!({
                    "key": p.key,
                    "display_name": p.display_name,
                    "type": p.ty.as_str(),
                    "required": p.required,
                    "default_value": p.default.map_or(Value::Null, DefaultValue::to_json),
                })
            })
            .collect();
        let outputs: Vec<Value> = self
            .outputs
            .iter()
            .map(|o| json!({"key": o.key, "type": o.ty.as_str()}))
            .collect();
        json!({
            "workflow_id": self.workflow_id,
            "revision_id": self.revision_id,
            "title": self.title,
            "description": self.description,
            "tags": self.tags,
            "covers": [format!("https://sim.chenyu.local/media/covers/{}.png", self.workflow_id)],
            "owner": {"user_id": 10001, "display_name": "wfq-sim"},
            "quote_currency": "CNY",
            "quote_amount": super::money::amount8(self.quote()),
            "may_incur_external_model_cost": self.may_incur_external_model_cost,
            "external_cost_notice": self.external_cost_notice,
            "editable_parameter_manifest": params,
            "candidate_output_manifest": outputs,
        })
    }
}

/// Looks a workflow up by id.
pub(crate) fn find(workflow_id: &str) -> Option<&'static Workflow> {
    CATALOG.iter().find(|w| w.workflow_id == workflow_id)
}

/// Every published workflow.
pub(crate) static CATALOG: &[Workflow] = &[TEXT_TO_IMAGE, SEEDANCE_VIDEO, ALWAYS_FAILS, AUDIO_DUB];

/// The documentation's own example, field for field.
const TEXT_TO_IMAGE: Workflow = Workflow {
    workflow_id: "wf_861ef31e94dcfb10e6e7",
    revision_id: "wfr_f9f2a2dcb99d73b0c3aa",
    title: "文生图111",
    description: "文生图基础工作流",
    tags: &["文生图", "E2E"],
    quote_units: 3_000_000,
    may_incur_external_model_cost: false,
    external_cost_notice: "",
    accepts_real_person_flag: false,
    params: &[
        Param {
            key: "n6_text",
            display_name: "正向提示词",
            ty: ValueType::String,
            required: true,
            default: Some(DefaultValue::Str(
                "beautiful scenery nature glass bottle landscape, , purple galaxy bottle,",
            )),
        },
        Param {
            key: "n7_text",
            display_name: "反向提示词",
            ty: ValueType::String,
            required: true,
            default: Some(DefaultValue::Str("text, watermark")),
        },
        Param {
            key: "n3_seed",
            display_name: "seed",
            ty: ValueType::Int,
            required: true,
            default: Some(DefaultValue::Int(156_680_208_700_286)),
        },
    ],
    outputs: &[Output {
        key: "n9_images",
        ty: ValueType::Image,
    }],
    outcome: Outcome::Succeeds,
};

/// A video workflow that calls a third-party model: needs cost consent,
/// takes every scalar type plus a media input, and bills external cost.
const SEEDANCE_VIDEO: Workflow = Workflow {
    workflow_id: "wf_seedance_video_2f0c",
    revision_id: "wfr_5eedance0video0c2f01",
    title: "Seedance 图生视频",
    description: "Seedance video generation (simulated); calls a third-party model",
    tags: &["视频", "Seedance"],
    quote_units: 120_000_000,
    may_incur_external_model_cost: true,
    external_cost_notice: "本工作流调用第三方视频模型,可能产生额外的第三方模型费用,以实际结算为准。",
    accepts_real_person_flag: true,
    params: &[
        Param {
            key: "prompt",
            display_name: "提示词",
            ty: ValueType::String,
            required: true,
            default: None,
        },
        Param {
            key: "image",
            display_name: "参考图",
            ty: ValueType::Image,
            required: false,
            default: None,
        },
        Param {
            key: "duration",
            display_name: "时长(秒)",
            ty: ValueType::Int,
            required: false,
            default: Some(DefaultValue::Int(5)),
        },
        Param {
            key: "resolution",
            display_name: "分辨率",
            ty: ValueType::String,
            required: false,
            default: Some(DefaultValue::Str("720p")),
        },
        Param {
            key: "guidance",
            display_name: "引导强度",
            ty: ValueType::Float,
            required: false,
            default: Some(DefaultValue::Float(7.5)),
        },
        Param {
            key: "watermark",
            display_name: "水印",
            ty: ValueType::Bool,
            required: false,
            default: Some(DefaultValue::Bool(false)),
        },
    ],
    outputs: &[Output {
        key: "video",
        ty: ValueType::Video,
    }],
    outcome: Outcome::Succeeds,
};

/// Every run fails in the engine, yet is settled like a real one.
const ALWAYS_FAILS: Workflow = Workflow {
    workflow_id: "wf_always_fails_9d1a",
    revision_id: "wfr_a1ways0fai1s09d1a00",
    title: "Always fails",
    description: "Simulator workflow whose runs always fail in the execution engine",
    tags: &["sim", "failure"],
    quote_units: 50_000_000,
    may_incur_external_model_cost: false,
    external_cost_notice: "",
    accepts_real_person_flag: false,
    params: &[Param {
        key: "prompt",
        display_name: "提示词",
        ty: ValueType::String,
        required: true,
        default: Some(DefaultValue::Str("x")),
    }],
    outputs: &[Output {
        key: "result",
        ty: ValueType::Image,
    }],
    outcome: Outcome::Fails {
        error_code: "ENGINE_EXECUTION_FAILED",
        error_message: "simulated engine failure: node n4 (KSampler) raised an out-of-memory error",
        charged_units: 1_000_000,
    },
};

/// Takes video and audio media inputs and produces audio, so clients meet
/// every media type.
const AUDIO_DUB: Workflow = Workflow {
    workflow_id: "wf_audio_dub_7c21",
    revision_id: "wfr_aud10dub7c21000001",
    title: "视频配音",
    description: "Dub a video with a reference voice (simulated)",
    tags: &["音频", "配音"],
    quote_units: 20_000_000,
    may_incur_external_model_cost: false,
    external_cost_notice: "",
    accepts_real_person_flag: false,
    params: &[
        Param {
            key: "video",
            display_name: "视频",
            ty: ValueType::Video,
            required: true,
            default: None,
        },
        Param {
            key: "voice",
            display_name: "参考音色",
            ty: ValueType::Audio,
            required: false,
            default: None,
        },
        Param {
            key: "script",
            display_name: "台词",
            ty: ValueType::String,
            required: true,
            default: Some(DefaultValue::Str("")),
        },
    ],
    outputs: &[Output {
        key: "audio",
        ty: ValueType::Audio,
    }],
    outcome: Outcome::Succeeds,
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doc_example_quote_and_ids() {
        let wf = find("wf_861ef31e94dcfb10e6e7").expect("doc workflow");
        let info = wf.market_info();
        assert_eq!(info["revision_id"], "wfr_f9f2a2dcb99d73b0c3aa");
        assert_eq!(info["quote_amount"], "0.03000000");
        assert_eq!(
            info["editable_parameter_manifest"][2]["default_value"],
            156_680_208_700_286_i64
        );
        assert_eq!(info["candidate_output_manifest"][0]["type"], "image");
    }

    #[test]
    fn ids_are_unique_and_failure_charge_fits_quote() {
        for (i, wf) in CATALOG.iter().enumerate() {
            assert!(
                CATALOG[i + 1..]
                    .iter()
                    .all(|o| o.workflow_id != wf.workflow_id)
            );
            if let Outcome::Fails { charged_units, .. } = wf.outcome {
                assert!(charged_units <= wf.quote_units);
            }
        }
    }
}
