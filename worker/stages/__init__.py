"""The pipeline's named stages, each a function from frozen inputs to a frozen result.

load → select and read → predict → assess → build outputs → write files →
save rows (→ deliver, :mod:`worker.delivery`). :func:`worker.pipeline.run_study`
composes them for one study; each can be run and tested alone.

========================  =========================================  ==================
stage                     function                                   result
========================  =========================================  ==================
load                      :func:`~worker.stages.load.load_study`       ``LoadedStudy``
select and read           :func:`~worker.stages.read.select_and_read`  ``ReadStudy``
predict (batched)         :func:`~worker.stages.predict.predict`       ``PredictedStudy``
assess (pure)             :func:`~worker.stages.assess.assess`         ``Assessment``
build outputs (SR, SC)    :func:`~worker.stages.outputs.build_outputs` ``StudyOutputs``
write files               :func:`~worker.stages.write.write_files`     file paths
save rows                 :func:`~worker.stages.save.save_rows`        result id
========================  =========================================  ==================
"""

from __future__ import annotations

from worker.stages.assess import Assessment, assess
from worker.stages.load import LoadedInstance, LoadedStudy, load_study
from worker.stages.outputs import StudyOutputs, build_outputs
from worker.stages.predict import PredictedImage, PredictedStudy, predict
from worker.stages.read import ReadInstance, ReadStudy, select_and_read
from worker.stages.save import save_rows
from worker.stages.timing import StageTimer
from worker.stages.write import write_files

__all__ = [
    "Assessment",
    "LoadedInstance",
    "LoadedStudy",
    "PredictedImage",
    "PredictedStudy",
    "ReadInstance",
    "ReadStudy",
    "StageTimer",
    "StudyOutputs",
    "assess",
    "build_outputs",
    "load_study",
    "predict",
    "save_rows",
    "select_and_read",
    "write_files",
]
