// Reload the worklist (same URL, so the same filters) unless paused or the user is typing.
(function () {
  var box = document.getElementById("autorefresh");
  if (!box) return;
  var seconds = parseInt(box.getAttribute("data-seconds"), 10) || 60;
  setInterval(function () {
    var typing = document.activeElement && document.activeElement.closest("form");
    if (box.checked && !typing) window.location.reload();
  }, seconds * 1000);
})();
