@echo off
rem ryzenai-server -> inferos serve (Windows). lemond runs:
rem     ryzenai-server -m <model_dir> --port N --ctx-size N [--verbose]
rem Arguments are forwarded unchanged. Which inferos runs, first match wins:
rem   1. %INFEROS_PYTHON% -m lemonade_inferos.cli   2. inferos on PATH   3. python on PATH
rem NOTE: lemond on Windows looks for ryzenai-server.exe; see README.md for making one.
setlocal
if not "%INFEROS_PYTHON%"=="" goto use_env_python
where inferos >nul 2>nul
if not errorlevel 1 goto use_inferos
python -c "import lemonade_inferos" >nul 2>nul
if not errorlevel 1 goto use_python
echo ryzenai-server (inferos shim): cannot find inferos: set INFEROS_PYTHON to a python.exe with lemonade-inferos installed, or put its Scripts folder on PATH. 1>&2
exit /b 127
:use_env_python
"%INFEROS_PYTHON%" -m lemonade_inferos.cli serve %*
exit /b %ERRORLEVEL%
:use_inferos
inferos serve %*
exit /b %ERRORLEVEL%
:use_python
python -m lemonade_inferos.cli serve %*
exit /b %ERRORLEVEL%
