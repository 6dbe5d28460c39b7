"""Student-teacher feature regression (EfficientAD-S's student/teacher part, Batzner et al., WACV 2024) on the
anomaly-model contract (:mod:`defectscope.models.anomaly`)."""

from defectscope.models.student_teacher.torch_model import (
    StudentPDN,
    StudentTeacher,
    StudentTeacherArgs,
    hard_feature_loss,
)

__all__ = ["StudentPDN", "StudentTeacher", "StudentTeacherArgs", "hard_feature_loss"]
