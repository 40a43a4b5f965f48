"""SEA: Sparse linear attention with an Estimated Attention mask (Lee et al., ICLR 2024)."""

from dataclasses import dataclass


@dataclass
class SEAConfig:
    k: int = 64  # kept keys per query per head (on long rows)
    predictor_length: int = 256  # T_M, width of the compressed attention rows
    nbf: int = 8  # Performer feature factor: m = int(D * ln(D) / nbf) random features

    def __post_init__(self):
        if self.k < 1:
            raise ValueError(f"SEAConfig.k={self.k} must be >= 1")
        if self.predictor_length < 4 or self.predictor_length % 4:
            raise ValueError(f"SEAConfig.predictor_length={self.predictor_length} must be a "
                             f"positive multiple of 4 (the decoder upsamples by 4)")
        if self.nbf <= 0:
            raise ValueError(f"SEAConfig.nbf={self.nbf} must be positive")
