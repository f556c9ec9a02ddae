"""Every MLflow tag mlflow-ema sets, declared once.

Three kinds of objects carry them: the training **run**, the checkpoint **LoggedModels**
(``raw-step<N>`` / ``ema-step<N>``) and the registered **model versions** of a soup. Every
value is a string (MLflow's tags are); booleans are ``"true"`` / ``"false"``. The README's
"Tags" table lists the same names.
"""

from __future__ import annotations

# -- on the checkpoint LoggedModels (uploader.Uploader._log_model) --------------------------

TAG_KIND = "mlflow_ema.kind"  # "raw", "ema" or "posthoc"; selection searches by it
TAG_STEP = "mlflow_ema.step"  # optimizer steps taken when the checkpoint was made
TAG_EPOCH = "mlflow_ema.epoch"  # epochs completed, when known (else not set)
TAG_MODEL = "mlflow_ema.model"  # the ``name=`` of watch(), when given
# The model's name among its run's models: watch(name=), else its class in lower case (``-2``...
# for a second of one class); checkpoint names start with it when the run trains several.
TAG_MODEL_NAME = "mlflow_ema.model_name"
# A post-hoc EMA snapshot's sigma_rel (``posthoc<sigma_rel>-step<N>``, kind "posthoc"); on a
# model version registered by ``mlflow-ema posthoc``, the sigma_rel it reconstructs
TAG_SIGMA_REL = "mlflow_ema.sigma_rel"
TAG_INIT_FINGERPRINT = "mlflow_ema.init_fingerprint"  # sha256 of the parameters before the first step
TAG_ALL_FINITE = "mlflow_ema.all_finite"  # "false" when a weight is NaN/inf (averaging refuses it)
TAG_FORMAT_VERSION = "mlflow_ema.format_version"  # the checkpoint manifest's format version
TAG_TRAINING_STATE = "mlflow_ema.training_state"  # "true" when training_state.pt is included (resume)
# On a LoggedModel and on a soup's model version (registry.register_soup): the weights'
# checkpoint.weights_digest, the file's sha256 or one over the shards' sha256sum listing.
TAG_SHA256 = "mlflow_ema.sha256"

# -- on the training run ------------------------------------------------------------------------

# How to rebuild the model without pickle (architecture.build_model reads them; tracking sets
# the first three once per run with the first checkpoint, lightning.EMACallback the fourth).
RUN_TAG_MODEL_CLASS = "mlflow_ema.model_class"  # "module:Class" of the watched model
RUN_TAG_MODEL_FACTORY = "mlflow_ema.model_factory"  # "module:function" given as model_factory=
RUN_TAG_MODEL_KWARGS = "mlflow_ema.model_kwargs"  # JSON object of model_kwargs= for that factory
RUN_TAG_MODEL_HPARAMS = "mlflow_ema.model_hparams"  # JSON of a LightningModule's hparams
# Why the run's architecture folder (mlflow_ema/architecture/) holds no program.pt2: "<model>: <reason>"
# (capture, with the first checkpoint). Without it and without the folder: mlflow-ema < 0.4.
RUN_TAG_ARCHITECTURE_ERROR = "mlflow_ema.architecture_error"
# JSON list of the checkpoints that could not be uploaded, each "<name>: <error> (kept at
# <folder>)" (tracking, when the run ends)
RUN_TAG_UPLOAD_FAILURES = "mlflow_ema.upload_failures"
# JSON list of "<part>: <ExcType>: <message>", parts switched off by the safety boundary (safety)
RUN_TAG_ERRORS = "mlflow_ema.errors"
# "true" on a soup run whose registration failed midway; it is deleted and never used (registry)
TAG_INCOMPLETE = "mlflow_ema.incomplete"

# -- on a soup's registered model version (registry.register_soup) -----------------------------

TAG_SOURCES = "mlflow_ema.sources"  # JSON list, per member: run_id, model_id, step, value, weight, sha256
TAG_STRATEGY = "mlflow_ema.strategy"  # the averaging strategy: "uniform" or "greedy"
TAG_VERSION = "mlflow_ema.version"  # the mlflow-ema version that made the soup
# "true" when the soup was scored (average --eval), "false" when averaged without it: promote
# --if-better refuses a "false" version, which has no value to compare
TAG_SCORED = "mlflow_ema.scored"

# -- on a promoted model version (registry.promote) ------------------------------------------

TAG_PROMOTED_TO = "mlflow_ema.promoted_to"  # the alias it was given
TAG_PROMOTED_FROM = "mlflow_ema.promoted_from"  # "version <N>" or "alias <A>" it was promoted from
TAG_PROMOTED_AT = "mlflow_ema.promoted_at"  # when: ISO 8601, UTC, seconds
TAG_REPLACED = "mlflow_ema.replaced_version"  # the version the alias pointed to before ("" if none)
