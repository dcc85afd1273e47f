from protos.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Decision(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DECISION_UNSPECIFIED: _ClassVar[Decision]
    DECISION_ALLOW: _ClassVar[Decision]
    DECISION_REVIEW: _ClassVar[Decision]
    DECISION_BLOCK: _ClassVar[Decision]
DECISION_UNSPECIFIED: Decision
DECISION_ALLOW: Decision
DECISION_REVIEW: Decision
DECISION_BLOCK: Decision

class ScoreTransactionRequest(_message.Message):
    __slots__ = ("transaction_id", "amount", "timestamp", "customer_ref", "card_ref", "features")
    class FeaturesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TRANSACTION_ID_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    CUSTOMER_REF_FIELD_NUMBER: _ClassVar[int]
    CARD_REF_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    transaction_id: str
    amount: float
    timestamp: float
    customer_ref: str
    card_ref: str
    features: _containers.ScalarMap[str, float]
    def __init__(self, transaction_id: _Optional[str] = ..., amount: _Optional[float] = ..., timestamp: _Optional[float] = ..., customer_ref: _Optional[str] = ..., card_ref: _Optional[str] = ..., features: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ReasonCode(_message.Message):
    __slots__ = ("feature", "contribution", "value")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    CONTRIBUTION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    feature: str
    contribution: float
    value: float
    def __init__(self, feature: _Optional[str] = ..., contribution: _Optional[float] = ..., value: _Optional[float] = ...) -> None: ...

class ScoreTransactionResponse(_message.Message):
    __slots__ = ("prediction_id", "fraud_probability", "decision", "reasons", "model", "review_threshold", "block_threshold")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    FRAUD_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    DECISION_FIELD_NUMBER: _ClassVar[int]
    REASONS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    REVIEW_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    BLOCK_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    fraud_probability: float
    decision: Decision
    reasons: _containers.RepeatedCompositeFieldContainer[ReasonCode]
    model: _common_pb2.ModelRef
    review_threshold: float
    block_threshold: float
    def __init__(self, prediction_id: _Optional[str] = ..., fraud_probability: _Optional[float] = ..., decision: _Optional[_Union[Decision, str]] = ..., reasons: _Optional[_Iterable[_Union[ReasonCode, _Mapping]]] = ..., model: _Optional[_Union[_common_pb2.ModelRef, _Mapping]] = ..., review_threshold: _Optional[float] = ..., block_threshold: _Optional[float] = ...) -> None: ...

class FraudOutcome(_message.Message):
    __slots__ = ("prediction_id", "is_fraud", "occurred_at", "source")
    PREDICTION_ID_FIELD_NUMBER: _ClassVar[int]
    IS_FRAUD_FIELD_NUMBER: _ClassVar[int]
    OCCURRED_AT_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    prediction_id: str
    is_fraud: bool
    occurred_at: float
    source: str
    def __init__(self, prediction_id: _Optional[str] = ..., is_fraud: _Optional[bool] = ..., occurred_at: _Optional[float] = ..., source: _Optional[str] = ...) -> None: ...
